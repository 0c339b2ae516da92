"""Load permutations as ``numpy.random.Generator.permutation`` draws them, about three times faster.

Permuting every load's rows is most of a sampler's per-epoch planning (100M rows a 100M-row epoch,
more where partial batches are carried). numpy's Fisher-Yates shuffle draws index ``j <= i`` by masked
rejection (``random_interval``) from the 32-bit halves of the bit generator's outputs, one function
call per draw, and mispredicts the rejection branch often. :func:`_permute` makes the same draws,
with PCG64 inlined, in two branch-free passes (indices, then swaps): the same permutations, and the
generator left in the same state, as ``rng.permutation(n)``.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

# PCG64's 128-bit LCG multiplier (numpy's PCG_DEFAULT_MULTIPLIER_128), high and low halves
_MULT_HI = 2549297995355413924
_MULT_LO = 4865540595714422341
_MASK64 = (1 << 64) - 1
# random_interval switches to 64-bit draws above this bound; _Permuter leaves such sizes to numpy
_MAX_N = 1 << 32


@intrinsic
def _mulhi(typingctx, a, b):  # type: ignore[no-untyped-def]  # pragma: no cover - numba
    """High 64 bits of the 128-bit product of two uint64 (one instruction, where numba has no int128)."""
    sig = types.uint64(types.uint64, types.uint64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i128 = ir.IntType(128)
        product = builder.mul(builder.zext(args[0], i128), builder.zext(args[1], i128))
        return builder.trunc(builder.lshr(product, ir.Constant(i128, 64)), ir.IntType(64))

    return sig, codegen


@intrinsic
def _clz(typingctx, a):  # type: ignore[no-untyped-def]  # pragma: no cover - numba
    """Leading zero bits of a non-zero uint64."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 1))

    return sig, codegen


@numba.njit(nogil=True, cache=True)
def _permute(state, out, j):  # type: ignore[no-untyped-def]  # pragma: no cover - numba
    """Shuffle ``out`` in place as ``Generator(PCG64).shuffle`` does, advancing ``state`` as numpy would.

    ``state`` is uint64 ``[state_hi, state_lo, inc_hi, inc_lo, has_uint32, uinteger]``; ``out``
    holds at most ``2**32`` items; ``j`` is uint64 scratch of at least ``len(out)`` items.
    """
    n = len(out)
    zero, one = np.uint64(0), np.uint64(1)  # uint64 throughout: mixing in int64 makes float64
    ones = np.uint64(0xFFFFFFFFFFFFFFFF)
    mult_hi, mult_lo = np.uint64(_MULT_HI), np.uint64(_MULT_LO)
    s_hi, s_lo, inc_hi, inc_lo = state[0], state[1], state[2], state[3]
    has_uint32, uinteger = state[4], state[5]
    # Pass 1: j[i] for i = n-1 .. 1. Every 32-bit word is tried against index i (masked to the
    # smallest 2**k - 1 >= i) and i moves on only if it was accepted: no branch on the random value.
    i = np.uint64(max(n - 1, 0))
    if i >= one and has_uint32:  # the upper half left over from the previous draw comes first
        has_uint32 = zero
        v = uinteger & (ones >> _clz(i))
        j[i] = v
        i -= one if v <= i else zero
    while i >= one:
        # PCG64 step (XSL-RR output): state = state * mult + inc (mod 2**128)
        lo = s_lo * mult_lo
        new_lo = lo + inc_lo
        carry = one if new_lo < lo else zero
        s_hi = _mulhi(s_lo, mult_lo) + s_lo * mult_hi + s_hi * mult_lo + inc_hi + carry
        s_lo = new_lo
        x = s_hi ^ s_lo
        rot = s_hi >> np.uint64(58)
        word = (x >> rot) | (x << ((np.uint64(64) - rot) & np.uint64(63)))
        uinteger = word >> np.uint64(32)
        v = word & np.uint64(0xFFFFFFFF) & (ones >> _clz(i))  # the lower half is drawn first
        j[i] = v
        i -= one if v <= i else zero
        if i < one:  # the upper half stays buffered for the next draw
            has_uint32 = one
            break
        v = uinteger & (ones >> _clz(i))
        j[i] = v
        i -= one if v <= i else zero
    state[0], state[1], state[4], state[5] = s_hi, s_lo, has_uint32, uinteger
    # Pass 2: the swaps
    for k in range(n - 1, 0, -1):
        t = out[k]
        out[k] = out[j[k]]
        out[j[k]] = t


class _Permuter:
    """Draws ``rng.permutation(n)`` for successive ``n``: the same arrays, faster for PCG64.

    It holds the PCG64 state itself while in use: draw nothing else from ``rng`` until
    :meth:`sync` has written the state back. Other bit generators are left to numpy.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._state = self._read_state()
        self._scratch = np.empty(0, dtype=np.uint64)  # the kernel's drawn indices, reused across calls

    def _read_state(self) -> np.ndarray | None:
        if type(self._rng.bit_generator) is not np.random.PCG64:
            return None
        s = self._rng.bit_generator.state
        pcg, inc = int(s["state"]["state"]), int(s["state"]["inc"])
        return np.array(
            [pcg >> 64, pcg & _MASK64, inc >> 64, inc & _MASK64, s["has_uint32"], s["uinteger"]],
            dtype=np.uint64,
        )

    def __call__(self, n: int) -> np.ndarray:
        """A permutation of ``arange(n)`` (int64), as ``rng.permutation(n)`` would draw it next."""
        if self._state is not None and n <= _MAX_N:
            if len(self._scratch) < n:
                self._scratch = np.empty(n, dtype=np.uint64)
            permutation = np.arange(n)  # numpy's own array (and dtype object), as permutation makes it
            _permute(self._state, permutation, self._scratch)
            return permutation
        self.sync()
        permutation = self._rng.permutation(n)
        self._state = self._read_state()
        return permutation

    def sync(self) -> None:
        """Write the state held back into ``rng``."""
        if self._state is None:
            return
        pcg_hi, pcg_lo, inc_hi, inc_lo, has_uint32, uinteger = (int(x) for x in self._state)
        self._rng.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": (pcg_hi << 64) | pcg_lo, "inc": (inc_hi << 64) | inc_lo},
            "has_uint32": has_uint32,
            "uinteger": uinteger,
        }
