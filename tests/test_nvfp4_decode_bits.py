"""The Hopper kernel's code -> bf16 bit formulas (pallas_kernels/nvfp4_decode.py), run on emulated PTX.

The formula is the function the kernel calls, given numpy stand-ins for the MLIR ops (`prmt` emulated from the
PTX ISA: bytes 0-3 from the first operand, 4-7 from the second, a selector nibble with bit 3 set replicates the
top bit of the byte it selects). It must give, for every code, the bf16 pattern value(code) * 2^-126 in the lane
the WGMMA layout expects (natural K: code 2j in the low half of register j, code 2j+1 in the high half; permuted K:
codes j and j + 4). The kernel itself is checked on every code and scale by tests/gpu."""
import types

import numpy as np

from pallas_kernels import nvfp4_decode as nd


def _prmt(a, b, c):
    tbl = np.asarray(a, np.uint64) | (np.asarray(b, np.uint64) << np.uint64(32))
    c = np.asarray(c, np.uint64)
    out = np.zeros(np.broadcast(tbl, c).shape, np.uint64)
    for i in range(4):
        sel = (c >> np.uint64(4 * i)) & np.uint64(0xF)
        byte = (tbl >> (np.uint64(8) * (sel & np.uint64(7)))) & np.uint64(0xFF)
        rep = np.where((byte >> np.uint64(7)) & np.uint64(1) == 1, np.uint64(0xFF), np.uint64(0))
        out |= np.where((sel & np.uint64(8)) != 0, rep, byte) << np.uint64(8 * i)
    return out.astype(np.uint32)


_ARITH = types.SimpleNamespace(
    andi=lambda a, b: np.bitwise_and(a, b, dtype=np.uint32),
    addi=lambda a, b: np.add(a, b, dtype=np.uint32),
    shrui=lambda a, b: np.right_shift(a, b, dtype=np.uint32),
    muli=lambda a, b: ((a.astype(np.uint64) * np.uint64(b)) & np.uint64(0xFFFFFFFF)).astype(np.uint32))
_UTILS = types.SimpleNamespace(prmt=_prmt)
_C32 = np.uint32


def _expected(w, codes_of=lambda j: (2 * j, 2 * j + 1)):
    """value(code) * 2^-126 as bf16 bits: sign at 15, the 3 magnitude bits at 8..6."""
    out = []
    for j in range(4):
        lanes = []
        for i in codes_of(j):
            code = (w >> np.uint32(4 * i)) & np.uint32(0xF)
            lanes.append(((code & np.uint32(7)) << np.uint32(6)) | ((code >> np.uint32(3)) << np.uint32(15)))
        out.append(lanes[0] | (lanes[1] << np.uint32(16)))
    return out


def _words():
    rng = np.random.default_rng(0)
    return np.concatenate([rng.integers(0, 2 ** 32, 500_000, dtype=np.uint64).astype(np.uint32),
                           np.arange(1 << 16, dtype=np.uint32), np.arange(1 << 16, dtype=np.uint32) << np.uint32(16),
                           np.array([0, 0xFFFFFFFF, 0x88888888, 0x77777777], np.uint32)])


def test_pair_bits_match_the_bf16_pattern_of_every_code():
    w = _words()
    want = _expected(w)
    got = nd._pair_bits(w, _C32, _ARITH, _UTILS)
    for j in range(4):
        np.testing.assert_array_equal(got[j], want[j], err_msg=f"register {j}")


def test_spread_bits_put_codes_j_and_j_plus_4_in_register_j():
    """The permuted-K decode: register j holds codes j (low half) and j + 4 (high half) of the word, for every
    code in every position (k_permutation's order)."""
    w = _words()
    want = _expected(w, codes_of=lambda j: (j, j + 4))
    got = nd._spread_bits(w, _C32, _ARITH, _UTILS)
    for j in range(4):
        np.testing.assert_array_equal(got[j], want[j], err_msg=f"register {j}")


def test_scale_conversion_without_mask_is_exact_for_every_scale_pair():
    """The permuted-K scale path (`_scale_pair_bits`, no mask) after cvt.rn.f16x2.e4m3x2 of two scale bytes must
    give bf16(s * 2^118) in both halves for every pair of finite non-negative E4M3 bytes (0 included: it gives
    2^103, the documented non-zero-scale requirement)."""
    import ml_dtypes
    b = np.arange(0x7F, dtype=np.uint8)                               # 0x00 .. 0x7E: finite, non-negative
    f16 = b.view(ml_dtypes.float8_e4m3fn).astype(np.float16).view(np.uint16).astype(np.uint32)
    lo, hi = np.meshgrid(f16, f16, indexing="ij")
    bits = nd._scale_pair_bits(lo | (hi << np.uint32(16)), _C32, _ARITH)
    got_lo = (bits & np.uint32(0xFFFF)).astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)
    got_hi = (bits >> np.uint32(16)).astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)
    s = b.view(ml_dtypes.float8_e4m3fn).astype(np.float64) * 2.0 ** 118
    s[0] = 2.0 ** 103
    np.testing.assert_array_equal(got_lo, np.broadcast_to(s[:, None], got_lo.shape))
    np.testing.assert_array_equal(got_hi, np.broadcast_to(s[None, :], got_hi.shape))


def test_bf16_pattern_is_value_times_2_to_minus_126():
    """The bits above, read as bf16, are e2m1 value * 2^-126 for all 16 codes (the kernel's scale fold relies
    on it)."""
    codes = np.arange(16, dtype=np.uint32)
    bits = ((codes & 7) << 6) | ((codes >> 3) << 15)
    as_f32 = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    want = np.asarray(nd.e2m1_value(codes.astype(np.int32)), np.float64) * 2.0 ** -126
    np.testing.assert_array_equal(as_f32, want)
