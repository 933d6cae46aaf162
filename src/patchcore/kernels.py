"""The compiled kernels the coreset selection and the searches share.

One squared distance for every comparison (float16 bit patterns converted by the CPU, sums in
vector lanes), so that a distance computed while picking the coreset and one computed while
searching the bank compare exactly; and the start of numba's thread pool, which must not change
torch's thread count.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.extending import intrinsic, overload


@numba.njit(parallel=True, cache=True)
def _touch_threads(out):  # pragma: no cover - compiled
    for i in numba.prange(out.shape[0]):
        out[i] = i


def start_compiled_threads() -> None:
    """Start numba's thread pool, keeping torch's thread count. numba's OpenMP pool sets the
    process's OpenMP thread count to its own when it starts, and torch's backbone uses that
    count: a user's OMP_NUM_THREADS=1 or torch.set_num_threads (a Ray actor's one CPU) would
    silently stop holding after the first compiled search, and the features change in the last
    bits with the thread count. Call before any parallel compiled function; cheap after the first."""
    global _threads_started
    if not _threads_started:
        threads = torch.get_num_threads()
        _touch_threads(np.empty(2, dtype=np.int64))
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        _threads_started = True


_threads_started = False


@intrinsic
def _half_to_float(typingctx, bits):  # pragma: no cover - compiled
    """A float16 bit pattern's value as float32 (numba has no float16 type; the CPU converts)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return numba.types.float32(numba.types.uint16), codegen


def as_float(value):  # pragma: no cover - compiled code calls the overload below
    raise NotImplementedError("only for compiled code")


@overload(as_float, inline="always")
def _as_float_overload(value):
    """A coordinate as float32: float16 bit patterns converted, float32 as it is."""
    if value == numba.types.uint16:
        return lambda value: _half_to_float(value)
    return lambda value: value


@numba.njit(fastmath={"reassoc", "contract"}, cache=True)
def squared_distance(points, i, centre):  # pragma: no cover - compiled
    # Every distance that decides a point's cell comes from this one function, so that they are
    # comparable; reassociation lets the sum run in vector lanes.
    row = points[i]
    total = np.float32(0.0)
    for k in range(centre.shape[0]):
        diff = as_float(row[k]) - centre[k]
        total += diff * diff
    return total
