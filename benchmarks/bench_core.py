"""`make bench-core`: the compiled CPU scan and the whole model, each against its reference, side by side.

    scan_fwd_speedup                   compiled scan vs the reference loop, forward, one mamba-130m layer
                                       (b=1, l=2048, d_inner=1536, N=16)                 target >= 10
    scan_fwd_bwd_speedup               forward+backward at l=512 vs autograd through the loop   target >= 10
    model_fwd_speedup_vs_transformers  a random mamba-130m-shaped model at l=1024 vs transformers'
                                       MambaForCausalLM with the same weights, tokens/s    target >= 3
"""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, write  # noqa: E402

from simba_cli.models.checkpoint import save_checkpoint  # noqa: E402
from simba_cli.models.config import OFFICIAL  # noqa: E402
from simba_cli.models.mamba import MambaLM  # noqa: E402
from simba_cli.ops.scan import selective_scan  # noqa: E402


def scan_inputs(l, d=1536, n=16, grad=False):
    g = torch.Generator().manual_seed(0)
    x = dict(u=torch.randn(1, l, d, generator=g), delta=torch.randn(1, l, d, generator=g) - 2,
             A=-torch.rand(d, n, generator=g) - 0.1, B=torch.randn(1, l, n, generator=g),
             C=torch.randn(1, l, n, generator=g), D_skip=torch.randn(d, generator=g),
             z=torch.randn(1, l, d, generator=g), delta_bias=torch.randn(d, generator=g) * 0.1)
    if grad:
        for v in x.values():
            v.requires_grad_()
    return x


def fwd_bwd(backend, x):
    y = selective_scan(**x, delta_softplus=True, backend=backend)
    y.sum().backward()


def main():
    torch.manual_seed(0)
    out = {}
    x = scan_inputs(2048)
    with torch.no_grad():
        selective_scan(**x, delta_softplus=True, backend="cpu")  # compile
        ref = best_of(lambda: selective_scan(**x, delta_softplus=True, backend="ref"), 2)
        cpu = best_of(lambda: selective_scan(**x, delta_softplus=True, backend="cpu"), 5)
    out.update(scan_fwd_ref_s=ref, scan_fwd_cpu_s=cpu, scan_fwd_speedup=ref / cpu)
    print(f"scan forward l=2048: reference {ref:.3f} s, compiled {cpu:.4f} s, {ref / cpu:.1f}x", flush=True)

    xg = scan_inputs(512, grad=True)
    fwd_bwd("cpu", xg)
    ref = best_of(lambda: fwd_bwd("ref", xg), 1)
    cpu = best_of(lambda: fwd_bwd("cpu", xg), 3)
    out.update(scan_fwd_bwd_ref_s=ref, scan_fwd_bwd_cpu_s=cpu, scan_fwd_bwd_speedup=ref / cpu)
    print(f"scan forward+backward l=512: reference {ref:.2f} s, compiled {cpu:.4f} s, {ref / cpu:.1f}x", flush=True)

    from transformers import MambaForCausalLM

    model = MambaLM(OFFICIAL["mamba-130m"]).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = save_checkpoint(model, Path(tmp) / "hf", fmt="hf")
        hf = MambaForCausalLM.from_pretrained(str(hf_dir)).eval()
    ids = torch.randint(0, 50000, (1, 1024))
    with torch.no_grad():
        model(ids[:, :64])
        hf(ids[:, :64])
        ours = best_of(lambda: model(ids), 3)
        theirs = best_of(lambda: hf(ids), 2)
        diff = (model(ids) - hf(ids).logits[..., :model.cfg.vocab_size]).abs().max().item()
    out.update(model_fwd_ours_s=ours, model_fwd_transformers_s=theirs, model_fwd_ours_tokens_per_s=1024 / ours,
               model_fwd_transformers_tokens_per_s=1024 / theirs, model_fwd_speedup_vs_transformers=theirs / ours,
               model_fwd_max_logit_diff=diff)
    print(f"mamba-130m forward l=1024: ours {ours:.2f} s, transformers {theirs:.2f} s, {theirs / ours:.2f}x "
          f"(max logit difference {diff:.1e})")
    write("core", out)


if __name__ == "__main__":
    main()
