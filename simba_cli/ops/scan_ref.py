"""The reference selective scan: a plain PyTorch loop over time, the oracle every backend is tested against.

Shapes (token-major, the layout the whole package uses):
    u, delta, z : (b, l, D)      D = d_inner channels
    A           : (D, N)         negative real diagonal of the state matrix
    B, C        : (b, l, N)      input-dependent, shared by all channels
    D_skip      : (D,)
    delta_bias  : (D,)
    lengths     : (b,)           number of real tokens per sequence; later positions are padding

Recurrence, per channel d and state n:
    dt_t = softplus(delta_t + delta_bias)          (if delta_softplus)
    h_t  = exp(dt_t A) * h_{t-1} + dt_t * B_t * u_t
    y_t  = C_t . h_t + D_skip * u_t
    out  = y * silu(z)                              (if z is given)

Padding positions get dt = 0 (so h carries through unchanged) and output 0, which makes the returned
last state the state after each sequence's last real token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_ref(
    u, delta, A, B, C, D_skip=None, z=None, delta_bias=None, delta_softplus=False,
    lengths=None, return_last_state=False,
):
    in_dtype = u.dtype
    work = torch.float64 if in_dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(work) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)
    if delta_softplus:
        delta = F.softplus(delta)
    mask = None
    if lengths is not None:
        mask = (torch.arange(u.shape[1], device=u.device)[None, :] < lengths[:, None]).to(work)
        delta = delta * mask[..., None]
    b, l, d = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(l):
        dA = torch.exp(delta[:, t, :, None] * A)  # (b, D, N)
        dBu = (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        h = dA * h + dBu
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    if D_skip is not None:
        y = y + u * D_skip.to(work)
    if z is not None:
        y = y * F.silu(z.to(work))
    if mask is not None:
        y = y * mask[..., None]
    y = y.to(in_dtype)
    return (y, h) if return_last_state else y
