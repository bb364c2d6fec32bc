"""`make bench-core`: the compiled CPU scan and the whole model, each against its reference, side by side.

    scan_fwd_speedup                   compiled scan vs the reference loop, forward, one mamba-130m layer
                                       (b=1, l=2048, d_inner=1536, N=16)                 target >= 10
    scan_fwd_bwd_speedup               forward+backward at l=512 vs autograd through the loop   target >= 10
    model_fwd_speedup_vs_transformers  a random mamba-130m-shaped model at l=1024 vs transformers'
                                       MambaForCausalLM with the same weights, tokens/s    target >= 3
    mamba2_scan_fwd_speedup            the chunked SSD scan vs the reference loop (`ssd_scan_ref`), forward,
                                       one mamba2-130m layer (b=1, l=2048, H=24, P=64, N=128, G=1, chunks
                                       of the block length the model uses on CPU, CPU_CHUNK_SIZE), medians
                                       of rounds taken side by side                         target >= 10
    mamba2_model_fwd_speedup_vs_transformers
                                       a random mamba2-130m-shaped Mamba2LM at l=1024 vs transformers'
                                       Mamba2ForCausalLM (its pure-PyTorch path) with the same weights,
                                       no grad, medians side by side                      target >= 3
    mamba2_model_fwd_vs_matmul_floor   that forward divided by its matmuls alone (every layer's in_proj and
                                       out_proj, the LM head), timed in the same rounds; and
    mamba2_model_fwd_speedup_bound     transformers' time divided by those matmuls: the most any forward that
                                       does them could gain on transformers on this machine

    model_fwd_vs_matmul_floor          the random mamba-130m-shaped model's forward at l=1024 divided by the
                                       time of its matmuls alone (in_proj, x_proj, dt_proj, out_proj of every
                                       layer and the LM head, same shapes), medians side by side  target <= 1.3
    decode_tokens_per_s_vs_transformers
                                       greedy generation of 256 tokens after a 512-token prompt, same weights:
                                       our prefill and recurrent decode vs transformers' generate with its
                                       cache, tokens/s                                      target >= 3
    decode_step_vs_weight_read_floor   one recurrent decode step (b=1) divided by the time of one matrix-vector
                                       product with each of the model's weight matrices (every layer's four
                                       projections and the LM head), side by side: at b=1 a step reads every
                                       weight once, so this floor bounds decoding on the machine's memory
                                       bandwidth (no target; it says how far any decoder could go)
    decode_speedup_bound               transformers' generation time over our prefill plus 256 steps at that
                                       floor: the most any decoder of these weights could gain on this machine
    pruned_prefill_speedup_share       time to the first token with a Simba-pruned prefill (linear to 0.1,
                                       2048 prompt tokens) against the dense prefill, divided by the FLOPs
                                       ratio of the two                                     target >= 0.85

    python benchmarks/bench_core.py                    every key, full size, into results/core.json
    python benchmarks/bench_core.py --only speed       the last three keys, full size; core.json keeps the others
    python benchmarks/bench_core.py --only mamba2      the Mamba-2 keys, full size; core.json keeps the others
    python benchmarks/bench_core.py --only mamba2 --tiny
                                       the same code at tiny shapes, in seconds: prints, writes nothing
"""

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import medians_side_by_side, write  # noqa: E402

from simba_cli.models.checkpoint import save_checkpoint  # noqa: E402
from simba_cli.models.config import OFFICIAL  # noqa: E402
from simba_cli.models.decode import generate  # noqa: E402
from simba_cli.models.mamba import MambaLM  # noqa: E402
from simba_cli.models.mamba2 import Mamba2LM, scan_chunk_size, ssd_scan_chunked, ssd_scan_ref  # noqa: E402
from simba_cli.ops.linear import linear  # noqa: E402
from simba_cli.ops.scan import selective_scan  # noqa: E402
from simba_cli.simba.flops_ssd import OFFICIAL_MAMBA2  # noqa: E402


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


def mamba1(tiny: bool) -> dict:
    l_fwd, l_bwd, d, l_model = (256, 128, 128, 128) if tiny else (2048, 512, 1536, 1024)
    out = {}
    x = scan_inputs(l_fwd, d)
    with torch.no_grad():
        selective_scan(**x, delta_softplus=True, backend="cpu")  # compile
        t = medians_side_by_side({"ref": lambda: selective_scan(**x, delta_softplus=True, backend="ref"),
                                  "cpu": lambda: selective_scan(**x, delta_softplus=True, backend="cpu")}, 7)
        ref, cpu = t["ref"], t["cpu"]
    out.update(scan_fwd_ref_s=ref, scan_fwd_cpu_s=cpu, scan_fwd_speedup=ref / cpu)
    print(f"scan forward l={l_fwd}: reference {ref:.3f} s, compiled {cpu:.4f} s, {ref / cpu:.1f}x", flush=True)

    xg = scan_inputs(l_bwd, d, grad=True)
    fwd_bwd("cpu", xg)
    t = medians_side_by_side({"ref": lambda: fwd_bwd("ref", xg), "cpu": lambda: fwd_bwd("cpu", xg)}, 3)
    ref, cpu = t["ref"], t["cpu"]
    out.update(scan_fwd_bwd_ref_s=ref, scan_fwd_bwd_cpu_s=cpu, scan_fwd_bwd_speedup=ref / cpu)
    print(f"scan forward+backward l={l_bwd}: reference {ref:.2f} s, compiled {cpu:.4f} s, {ref / cpu:.1f}x",
          flush=True)

    from transformers import MambaForCausalLM

    cfg = dataclasses.replace(OFFICIAL["mamba-130m"], n_layer=2) if tiny else OFFICIAL["mamba-130m"]
    model = MambaLM(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = save_checkpoint(model, Path(tmp) / "hf", fmt="hf")
        hf = MambaForCausalLM.from_pretrained(str(hf_dir)).eval()
    ids = torch.randint(0, 50000, (1, l_model))
    with torch.no_grad():
        model(ids[:, :64])
        hf(ids[:, :64])
        t = medians_side_by_side({"ours": lambda: model(ids), "theirs": lambda: hf(ids, use_cache=False)}, 3)
        ours, theirs = t["ours"], t["theirs"]
        diff = (model(ids) - hf(ids).logits[..., :model.cfg.vocab_size]).abs().max().item()
    out.update(model_fwd_ours_s=ours, model_fwd_transformers_s=theirs, model_fwd_ours_tokens_per_s=l_model / ours,
               model_fwd_transformers_tokens_per_s=l_model / theirs, model_fwd_speedup_vs_transformers=theirs / ours,
               model_fwd_max_logit_diff=diff)
    print(f"mamba-130m forward l={l_model}: ours {ours:.2f} s, transformers {theirs:.2f} s, {theirs / ours:.2f}x "
          f"(max logit difference {diff:.1e})", flush=True)
    return out


def ssd_inputs(l, heads, head_dim, n, groups=1):
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(1, l, heads, head_dim, generator=g),
                dt=torch.nn.functional.softplus(torch.randn(1, l, heads, generator=g) - 2),
                A=-torch.rand(heads, generator=g) * 8 - 0.5, B=torch.randn(1, l, groups, n, generator=g),
                C=torch.randn(1, l, groups, n, generator=g), D=torch.randn(heads, generator=g))


def mamba2(tiny: bool) -> dict:
    official = OFFICIAL_MAMBA2["mamba2-130m"]  # H = 24 heads of P = 64, N = 128, G = 1
    if tiny:
        l_scan, shape, chunk, l_model = 256, dict(heads=4, head_dim=16, n=16), 64, 128
        cfg = dataclasses.replace(official, n_layer=2)
    else:
        l_scan, chunk, l_model, cfg = 2048, scan_chunk_size(official, torch.device("cpu")), 1024, official
        shape = dict(heads=official.n_heads, head_dim=official.head_dim, n=official.d_state)
    out = {}
    x = ssd_inputs(l_scan, **shape)
    with torch.no_grad():
        diff = (ssd_scan_ref(**x) - ssd_scan_chunked(**x, chunk_size=chunk)).abs().max().item()
        t = medians_side_by_side({"ref": lambda: ssd_scan_ref(**x),
                                  "chunked": lambda: ssd_scan_chunked(**x, chunk_size=chunk)}, 3)
    ref, chunked = t["ref"], t["chunked"]
    out.update(mamba2_scan_fwd_ref_s=ref, mamba2_scan_fwd_chunked_s=chunked, mamba2_scan_fwd_speedup=ref / chunked,
               mamba2_scan_fwd_chunk_size=chunk, mamba2_scan_fwd_max_diff=diff)
    print(f"SSD scan forward l={l_scan}: reference {ref:.3f} s, chunked (Q={chunk}) {chunked:.4f} s, "
          f"{ref / chunked:.1f}x (max difference {diff:.1e})", flush=True)

    from transformers import Mamba2ForCausalLM

    model = Mamba2LM(cfg)
    model.reset_parameters(seed=0)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = save_checkpoint(model, Path(tmp) / "hf", fmt="hf")
        hf = Mamba2ForCausalLM.from_pretrained(str(hf_dir)).eval()
    ids = torch.randint(0, 50000, (1, l_model))
    floor, blas_floor = linear_floor(model, l_model), linear_floor(model, l_model, torch.nn.functional.linear)
    with torch.no_grad():
        model(ids[:, :64])
        hf(ids[:, :64], use_cache=False)
        floor()
        blas_floor()
        t = medians_side_by_side({"ours": lambda: model(ids), "theirs": lambda: hf(ids, use_cache=False),
                                  "matmuls": floor, "matmuls_blas": blas_floor}, 3)
        diff = (model(ids) - hf(ids, use_cache=False).logits[..., :cfg.vocab_size]).abs().max().item()
    ours, theirs, matmuls = t["ours"], t["theirs"], t["matmuls"]
    out.update(mamba2_model_matmuls_blas_s=t["matmuls_blas"],
               mamba2_model_matmuls_onednn_speedup=t["matmuls_blas"] / matmuls)
    out.update(mamba2_model_fwd_ours_s=ours, mamba2_model_fwd_transformers_s=theirs,
               mamba2_model_fwd_ours_tokens_per_s=l_model / ours,
               mamba2_model_fwd_transformers_tokens_per_s=l_model / theirs,
               mamba2_model_fwd_speedup_vs_transformers=theirs / ours, mamba2_model_fwd_max_logit_diff=diff,
               mamba2_model_matmuls_s=matmuls, mamba2_model_fwd_vs_matmul_floor=ours / matmuls,
               mamba2_model_fwd_speedup_bound=theirs / matmuls)
    name = "mamba2-130m" + (f" ({cfg.n_layer} layers)" if tiny else "")
    print(f"{name} forward l={l_model}: ours {ours:.2f} s, transformers {theirs:.2f} s, {theirs / ours:.2f}x "
          f"(max logit difference {diff:.1e}); its matmuls alone {matmuls:.2f} s: ours is {ours / matmuls:.2f}x "
          f"that floor, and no forward with these matmuls could beat transformers by more than "
          f"{theirs / matmuls:.2f}x; those matmuls through F.linear {t['matmuls_blas']:.2f} s "
          f"({t['matmuls_blas'] / matmuls:.2f}x oneDNN's)", flush=True)
    return out


def linear_floor(model: torch.nn.Module, rows: int, product=linear):
    """A callable doing the model's matmuls alone: every linear layer (Mamba-1's in_proj, x_proj, dt_proj and
    out_proj, Mamba-2's in_proj and out_proj, the LM head) once, on random inputs of `rows` tokens. At rows = l
    it is the forward's matmul floor; at rows = 1 one matrix-vector product per weight, what a decode step
    cannot do faster, since it reads every weight once. `product` runs each one: `ops.linear.linear` (what
    the models call: oneDNN on CPU) or `F.linear` (the BLAS call transformers' layers make)."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, rows, m.in_features, generator=g) for m in layers]

    def run():
        for m, x in zip(layers, inputs):
            product(x, m.weight, m.bias)

    return run


def speed(tiny: bool) -> dict:
    """The forward against its matmul floor, decoding against transformers, and a pruned prefill."""
    from transformers import MambaForCausalLM

    from simba_cli.simba.pruned import pruned_prefill
    from simba_cli.simba.runner import generation_flops
    from simba_cli.simba.settings import DENSE, PruneConfig

    l_model, prompt, new, l_prefill = (128, 64, 16, 256) if tiny else (1024, 512, 256, 2048)
    cfg = dataclasses.replace(OFFICIAL["mamba-130m"], n_layer=2) if tiny else OFFICIAL["mamba-130m"]
    model = MambaLM(cfg).eval()
    out = {}
    ids = torch.randint(0, 50000, (1, l_model))
    with torch.no_grad():
        floor, blas_floor = linear_floor(model, l_model), linear_floor(model, l_model, torch.nn.functional.linear)
        model(ids[:, :64])
        floor()
        blas_floor()
        t = medians_side_by_side({"model": lambda: model(ids), "matmuls": floor, "matmuls_blas": blas_floor}, 5)
    out.update(model_fwd_s=t["model"], model_matmuls_s=t["matmuls"],
               model_fwd_vs_matmul_floor=t["model"] / t["matmuls"], model_matmuls_blas_s=t["matmuls_blas"],
               model_matmuls_onednn_speedup=t["matmuls_blas"] / t["matmuls"])
    print(f"forward l={l_model}: {t['model']:.3f} s, its matmuls alone {t['matmuls']:.3f} s, "
          f"{t['model'] / t['matmuls']:.2f}x the floor; those matmuls through F.linear {t['matmuls_blas']:.3f} s",
          flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        hf = MambaForCausalLM.from_pretrained(str(save_checkpoint(model, Path(tmp) / "hf", fmt="hf"))).eval()
    prompt_ids = torch.randint(0, 50000, (1, prompt))
    def ours():
        return generate(model, prompt_ids, new)

    def theirs():
        return hf.generate(prompt_ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                           pad_token_id=0)[:, prompt:]

    with torch.no_grad():
        ours_ids, theirs_ids = ours(), theirs()
        t = medians_side_by_side({"ours": ours, "theirs": theirs}, 3)
    agree = float((ours_ids == theirs_ids).float().mean())
    out.update(decode_ours_s=t["ours"], decode_transformers_s=t["theirs"],
               decode_ours_tokens_per_s=new / t["ours"], decode_transformers_tokens_per_s=new / t["theirs"],
               decode_tokens_per_s_vs_transformers=t["theirs"] / t["ours"], decode_tokens_agree=agree)
    print(f"greedy decode, {new} tokens after {prompt}: ours {new / t['ours']:.1f} tokens/s, transformers "
          f"{new / t['theirs']:.1f} tokens/s, {t['theirs'] / t['ours']:.2f}x ({agree:.0%} of tokens agree)",
          flush=True)

    from simba_cli.models.decode import prefill, step

    with torch.no_grad():
        logits, state = prefill(model, prompt_ids)
        token, floor = logits.argmax(-1), linear_floor(model, 1)
        blas_floor = linear_floor(model, 1, torch.nn.functional.linear)
        step(model, token, state)
        floor()
        blas_floor()
        t = medians_side_by_side({"step": lambda: step(model, token, state), "floor": floor,
                                  "floor_blas": blas_floor, "prefill": lambda: prefill(model, prompt_ids)}, 20)
    # our prefill, then every step at the floor: no decoder of these weights on this machine does better
    bound = out["decode_transformers_s"] / (t["prefill"] + new * t["floor"])
    out.update(decode_step_s=t["step"], decode_weight_read_floor_s=t["floor"],
               decode_step_vs_weight_read_floor=t["step"] / t["floor"], decode_prefill_s=t["prefill"],
               decode_speedup_bound=bound, decode_weight_read_blas_s=t["floor_blas"],
               decode_weight_read_onednn_speedup=t["floor_blas"] / t["floor"])
    print(f"decode step {t['step'] * 1e3:.1f} ms, reading every weight once {t['floor'] * 1e3:.1f} ms, "
          f"{t['step'] / t['floor']:.2f}x its floor; our prefill and {new} steps at that floor would be "
          f"{bound:.2f}x transformers; that floor through F.linear {t['floor_blas'] * 1e3:.1f} ms", flush=True)

    pruned = PruneConfig(schedule="linear", final_keep=0.1)
    long_ids = torch.randint(0, 50000, (1, l_prefill))
    prefill = pruned_prefill(pruned)
    dense_prefill = pruned_prefill(DENSE)
    with torch.no_grad():
        prefill(model, long_ids)
        t = medians_side_by_side({"dense": lambda: dense_prefill(model, long_ids),
                                  "pruned": lambda: prefill(model, long_ids)}, 5)
    flops_ratio = generation_flops(cfg, DENSE, l_prefill, 1).total / generation_flops(cfg, pruned, l_prefill, 1).total
    speedup = t["dense"] / t["pruned"]
    out.update(prefill_dense_s=t["dense"], prefill_pruned_s=t["pruned"], pruned_prefill_speedup=speedup,
               pruned_prefill_flops_ratio=flops_ratio, pruned_prefill_speedup_share=speedup / flops_ratio)
    print(f"time to first token, {l_prefill} prompt tokens: dense {t['dense']:.3f} s, pruned (linear to 0.1) "
          f"{t['pruned']:.3f} s, {speedup:.2f}x for a FLOPs ratio of {flops_ratio:.2f} "
          f"(share {speedup / flops_ratio:.2f})", flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["mamba", "mamba2", "speed"],
                        help="only this group's keys (results/core.json keeps the others' figures)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, seconds: a check that the benchmark runs; "
                                                            "prints its figures and writes nothing")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = {}
    if args.only in (None, "mamba"):
        out.update(mamba1(args.tiny))
    if args.only in (None, "mamba2"):
        out.update(mamba2(args.tiny))
    if args.only in (None, "speed"):
        out.update(speed(args.tiny))
    if args.tiny:
        print(f"tiny shapes: {len(out)} figures, not written")
        return
    write("core", out, update=args.only is not None)


if __name__ == "__main__":
    main()
