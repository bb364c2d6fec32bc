"""Scalar helpers for the numba CPU kernels (scan and Simba score).

The kernels' cost is almost all exp(dt * A), one per (token, channel, state). numba calls libm's
scalar exp, which does not vectorise, so the kernels evaluate 2^x themselves: split x = k + f with
k = floor(x), a degree-5 polynomial for 2^f on [0, 1) (relative error below 2e-7, float32 rounding
level) and 2^k built from the float32 exponent bits. Written as two loops over channels (polynomial
and exponent bits into buffers, then the product), LLVM vectorises both; this is about 4x faster than
libm's exp in the scan.

Callers pass x already scaled by log2(e) and fill two buffers of the same length:
    p[j]     = exp2_poly(f)
    ebits[j] = exp2_bits(k)     (ebits viewed as float32 is 2^k)
"""

import numba as nb
import numpy as np
import torch

LOG2E = np.float32(1.4426950408889634)
# Exponents below -126 would be float32 denormals; 2^-126 is already 0 for every purpose here.
X_MIN = np.float32(-126.0)
X_MAX = np.float32(127.0)


@nb.njit(inline="always", fastmath=True)
def exp2_poly(f):
    """2^f for f in [0, 1): minimax polynomial, float32."""
    q = np.float32(1.8775767e-3)
    q = q * f + np.float32(8.9893397e-3)
    q = q * f + np.float32(5.5826318e-2)
    q = q * f + np.float32(2.4015361e-1)
    q = q * f + np.float32(6.9315308e-1)
    return q * f + np.float32(9.9999994e-1)


@nb.njit(inline="always", fastmath=True)
def exp2_bits(k):
    """float32 bit pattern of 2^k for integer-valued float k in [-126, 127]."""
    return (np.int32(k) + np.int32(127)) << np.int32(23)


@nb.njit(inline="always", fastmath=True)
def softplus_inplace(x, p, ebits):
    """x <- log(1 + e^x) = max(x, 0) + log1p(e^-|x|) over a 1-d chunk, vectorised (libm's log1p is not).

    With q = e^-|x| in (0, 1], log1p(q) = 2 atanh(r) for r = q / (2 + q) <= 1/3, and the odd series
    2 (r + r^3/3 + ... + r^11/11) leaves out less than 1e-7 of it: float32 rounding level. The exact
    form needs no threshold: above 20 it returns x, as torch's softplus does. Below -87 the result stays at
    2^-126 (about 1e-38; float32 would go subnormal there). p, ebits are scratch buffers.
    """
    e2 = ebits.view(np.float32)
    for j in range(x.shape[0]):
        e = max(-abs(x[j]) * LOG2E, X_MIN)
        k = np.floor(e)
        p[j] = exp2_poly(e - k)
        ebits[j] = exp2_bits(k)
    for j in range(x.shape[0]):
        q = p[j] * e2[j]
        r = q / (np.float32(2.0) + q)
        r2 = r * r
        series = np.float32(1.0 / 9.0) + r2 * np.float32(1.0 / 11.0)
        series = np.float32(1.0 / 7.0) + r2 * series
        series = np.float32(1.0 / 5.0) + r2 * series
        series = np.float32(1.0 / 3.0) + r2 * series
        x[j] = max(x[j], np.float32(0.0)) + np.float32(2.0) * r * (np.float32(1.0) + r2 * series)


def f32(t) -> np.ndarray:
    """A contiguous float32 numpy array of t, detached: what every kernel reads (a view when t already is one)."""
    return t.detach().to(torch.float32).contiguous().numpy()


def f32_rows(t):
    """A float32 numpy view of t (b, l, D) when its channels are contiguous (a slice of in_proj's output is),
    else a contiguous copy: the kernels read a chunk of channels at a time, so only the last stride matters."""
    t = t.detach().to(torch.float32)
    return t.numpy() if t.stride(-1) == 1 else t.contiguous().numpy()


def f32_flat_rows(t) -> tuple[np.ndarray, int]:
    """(flat, row_stride) for t (b, l, D): a 1-d float32 numpy view from t's first element to its last, row r of
    its b l rows starting at flat[r * row_stride]. A view of t itself when its rows are evenly spaced with
    contiguous channels (a slice of in_proj's output is), else of a contiguous copy. Unlike `f32_rows`, the
    kernels see a contiguous array and LLVM vectorises their loops over channels."""
    b, l, d = t.shape
    rows = t.detach().to(torch.float32).reshape(b * l, d)  # a view where the strides allow, else a copy
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    row_stride = rows.stride(0) if b * l > 1 else d
    if b * l == 0:
        return np.empty(0, np.float32), d
    return torch.as_strided(rows, ((b * l - 1) * row_stride + d,), (1,), rows.storage_offset()).numpy(), row_stride


def channel_chunks(batch: int, channels: int) -> int:
    """Channel-chunk width so that batch x chunks keeps every numba thread busy."""
    threads = nb.get_num_threads()
    n_chunks = max(1, -(-threads // max(1, batch)))  # an empty batch has no work to split
    width = -(-channels // n_chunks)
    return max(16, -(-width // 16) * 16)


@nb.njit(inline="always", fastmath=True)
def silu_inplace(x, p, ebits):
    """x <- x * sigmoid(x) over a 1-d chunk, with the vectorised exp; p and ebits are scratch buffers."""
    e2 = ebits.view(np.float32)
    for j in range(x.shape[0]):
        e = min(max(-x[j] * LOG2E, X_MIN), X_MAX)
        k = np.floor(e)
        p[j] = exp2_poly(e - k)
        ebits[j] = exp2_bits(k)
    for j in range(x.shape[0]):
        x[j] = x[j] / (np.float32(1.0) + p[j] * e2[j])
