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
def softplus(x):
    # Same threshold as torch.nn.functional.softplus (beta=1, threshold=20).
    return x if x > np.float32(20.0) else np.log1p(np.exp(x))


def channel_chunks(batch: int, channels: int) -> int:
    """Channel-chunk width so that batch x chunks keeps every numba thread busy."""
    threads = nb.get_num_threads()
    n_chunks = max(1, -(-threads // batch))
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
