"""Binary signatures (ASMK*): sign binarisation packed MSB-first, and popcount Hamming distance."""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@njit(cache=True)
def pack_bits(unit):
    """Binarise rows of ``unit`` (W, D) float by sign and pack them MSB-first into (W, ceil(D/8)) uint8.

    Bit t of row w is 1 iff unit[w, t] > 0 (the official ASMK* rule). Padding bits of the last byte are 0.
    """
    W, D = unit.shape
    nbytes = (D + 7) // 8
    out = np.empty((W, nbytes), np.uint8)
    for w in range(W):
        row = unit[w]
        for b in range(nbytes):
            byte = 0
            for j in range(min(8, D - 8 * b)):
                byte = (byte << 1) | (1 if row[8 * b + j] > 0 else 0)
            if D - 8 * b < 8:  # last, partial byte: pad with zero bits at the end (MSB-first)
                byte <<= 8 - (D - 8 * b)
            out[w, b] = byte
    return out


@intrinsic
def _ctpop64(typingctx, x):
    """llvm.ctpop.i64: one POPCNT instruction on CPUs that have it (numba compiles for the host CPU)."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(fn, [args[0]])

    return types.int64(types.uint64), codegen


@njit(cache=True, inline="always")
def popcount64(x):
    """Set bits of a uint64 (hardware popcount)."""
    return _ctpop64(np.uint64(x))


@njit(cache=True, inline="always")
def popcount(x):
    """Set bits of an unsigned integer of up to 64 bits (uint8 bytes or uint64 words)."""
    return popcount64(np.uint64(x))


def as_words64(bits: np.ndarray) -> np.ndarray:
    """View packed signatures (W, nbytes) uint8 as (W, nbytes/8) uint64 when nbytes is a multiple of 8, so the
    Hamming distance takes one popcount per 64 bits; otherwise return them unchanged. Same bit count either way."""
    if bits.shape[1] % 8 == 0 and bits.shape[1] and bits.flags.c_contiguous:
        return bits.view(np.uint64)
    return bits


@njit(cache=True)
def hamming(a, b):
    """Number of differing bits between two packed rows (uint8 or uint64, same length)."""
    h = 0
    for i in range(a.shape[0]):
        h += popcount(a[i] ^ b[i])
    return h
