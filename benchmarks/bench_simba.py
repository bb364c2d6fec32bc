"""`make bench-simba`: Simba's wall-clock speed-up against its FLOPs reduction, and the criterion's cost.

For a random mamba-130m-shaped model at l=2048 on CPU, side by side in one run:
    speedup               dense time / Simba (linear to 0.1) time, logits at every position ("exit")
    flops_ratio           dense FLOPs / Simba FLOPs, both measured by the forward
    speedup_vs_flops      speedup / flops_ratio                                   target >= 0.85
    criterion_cost_share  the Simba score of one layer / one dense layer's forward  target <= 0.10
    criterion_cost_shares every criterion's the same way (name -> share); the ones beyond the paper
                          (simba-window, simba-split, simba-channels) within 2x Simba's. The window's
                          `max` option, |W| passes of Simba, is listed beside them for what it costs.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, write  # noqa: E402

from simba_cli.models.config import OFFICIAL  # noqa: E402
from simba_cli.models.mamba import MambaLM  # noqa: E402
from simba_cli.simba.criteria import CRITERIA, LayerView, score, simba_score  # noqa: E402
from simba_cli.simba.pruned import pruned_forward  # noqa: E402
from simba_cli.simba.settings import DENSE, PruneConfig  # noqa: E402


def main():
    torch.manual_seed(0)
    model = MambaLM(OFFICIAL["mamba-130m"]).eval()
    ids = torch.randint(0, 50000, (1, 2048))
    simba = PruneConfig("linear", 0.1, criterion="simba")
    with torch.no_grad():
        pruned_forward(model, ids[:, :128], simba)  # compile the kernels
        dense_out, simba_out = pruned_forward(model, ids, DENSE), pruned_forward(model, ids, simba)
        times = {"dense": [], "simba": []}
        for _ in range(3):  # interleaved, so both see the same machine
            times["dense"].append(best_of(lambda: pruned_forward(model, ids, DENSE), 1))
            times["simba"].append(best_of(lambda: pruned_forward(model, ids, simba), 1))
        dense_t, simba_t = min(times["dense"]), min(times["simba"])

        block = model.layers[0]
        hidden = model.embed(ids)
        lengths = torch.tensor([2048])
        out, _ = block(hidden, None, lengths, keep_scan_inputs=True)
        layer_t = best_of(lambda: block(hidden, None, lengths), 5)
        simba_score(out.scan, lengths)
        score_t = best_of(lambda: simba_score(out.scan, lengths), 5)
        shares = {}
        last = torch.arange(2048)[None, :] == 2047
        view = LayerView(out.scan, out.out, lengths, torch.tensor([1024]), 0, protected=last,
                         caller_protected=torch.tensor([False]))
        for name in [*CRITERIA, "simba-window:32:max"]:
            score(name, view)  # compile
            shares[name] = best_of(lambda name=name: score(name, view), 5) / layer_t
    flops_ratio = dense_out.flops.total / simba_out.flops.total
    speedup = dense_t / simba_t
    figures = {"dense_s": dense_t, "simba_s": simba_t, "speedup": speedup, "flops_ratio": flops_ratio,
               "speedup_vs_flops": speedup / flops_ratio, "dense_flops": dense_out.flops.total,
               "simba_flops": simba_out.flops.total, "mean_keep": simba_out.flops.mean_keep,
               "layer_s": layer_t, "criterion_s": score_t, "criterion_cost_share": score_t / layer_t,
               "criterion_cost_shares": shares}
    print(f"dense {dense_t:.2f} s, Simba {simba_t:.2f} s: {speedup:.2f}x for {flops_ratio:.2f}x fewer FLOPs "
          f"({speedup / flops_ratio:.0%}); criterion {score_t * 1e3:.1f} ms = {score_t / layer_t:.1%} of a layer")
    print("criterion cost, share of a dense layer: " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()))
    ok = lambda good: "met" if good else "MISSED"
    beyond = max(shares[k] for k in ("simba-window", "simba-split", "simba-channels"))
    print(f"targets: speed-up >= 85% of the FLOPs ratio: {ok(speedup >= 0.85 * flops_ratio)}; "
          f"criterion <= 10% of a dense layer: {ok(score_t <= 0.10 * layer_t)}; "
          f"new criteria within 2x Simba's: {ok(beyond <= 2 * shares['simba'])}")
    write("simba", figures)


if __name__ == "__main__":
    main()
