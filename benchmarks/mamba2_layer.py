"""Where a Mamba-2 layer's forward time goes on CPU: one layer of a random mamba2-130m-shaped model at l=1024,
inference, each stage timed side by side (medians of rounds), with the rate of its products where it has some.

    block norm, in_proj, conv, step sizes, SSD scan, gated norm, out_proj, and the whole mixer

The scan's products count 2 l Q (G N + H P) FLOPs within blocks (full Q x Q blocks) and 4 l H P N across
them (each block's own state and the reads of the state entering it).

    python benchmarks/mamba2_layer.py            # about 10 seconds; prints, writes nothing
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import medians_side_by_side  # noqa: E402

from simba_cli.models.mamba2 import Mamba2LM, scan_chunk_size, ssd_scan_chunked  # noqa: E402
from simba_cli.ops.conv import causal_conv1d  # noqa: E402
from simba_cli.simba.flops_ssd import OFFICIAL_MAMBA2  # noqa: E402

L = 1024


def main():
    cfg = OFFICIAL_MAMBA2["mamba2-130m"]
    model = Mamba2LM(cfg)
    model.reset_parameters(seed=0)
    block = model.eval().layers[0]
    m = block.mixer
    hidden = torch.randn(1, L, cfg.d_model, generator=torch.Generator().manual_seed(0))
    Q = scan_chunk_size(cfg, hidden.device)
    with torch.no_grad():
        normed, _ = block.norm_residual(hidden, hidden)
        z, xbc_in, dt_raw = m.split_projection(normed)
        xbc = causal_conv1d(xbc_in, m.conv1d.weight.squeeze(1), m.conv1d.bias, silu=True)
        x, B, C = m.split_xbc(xbc)
        dt, A = m.step_sizes(dt_raw), m.A()
        y = ssd_scan_chunked(x, dt, A, B, C, m.D, chunk_size=Q)
        y = y.reshape(1, L, cfg.d_inner)
        gated = m.norm(y, z)
        stages = {
            "block norm": lambda: block.norm_residual(hidden, hidden),
            "in_proj": lambda: m.in_proj(normed),
            "conv": lambda: causal_conv1d(xbc_in, m.conv1d.weight.squeeze(1), m.conv1d.bias, silu=True),
            "step sizes": lambda: m.step_sizes(dt_raw),
            "SSD scan": lambda: ssd_scan_chunked(x, dt, A, B, C, m.D, chunk_size=Q),
            "gated norm": lambda: m.norm(y, z),
            "out_proj": lambda: m.out_proj(gated),
            "whole mixer": lambda: m.mix(normed),
        }
        for f in stages.values():
            f()
        t = medians_side_by_side(stages, 15)
    G, N, H, P = cfg.n_groups, cfg.d_state, cfg.n_heads, cfg.head_dim
    flops = {"in_proj": 2 * L * cfg.d_model * m.in_proj.out_features, "out_proj": 2 * L * cfg.d_inner * cfg.d_model,
             "SSD scan": 2 * L * Q * (G * N + H * P) + 4 * L * H * P * N}
    for name, s in t.items():
        rate = f"  {flops[name] / s / 1e9:6.0f} GFLOP/s" if name in flops else ""
        print(f"{name:12s} {s * 1e3:7.2f} ms{rate}")


if __name__ == "__main__":
    main()
