"""NVFP4 (e2m1 codes + E4M3 block scales) -> bf16 decode for the Hopper kernels.

Hopper has no e2m1 conversion that Mosaic GPU will emit (its f4e2m1fn casts are Blackwell-only), so the kernel
turns codes into bf16 with integer ops on the packed 32-bit words it loads from shared memory: the sign goes to
bit 15 and the magnitude bits (e1 e0 m) to bits 8..6 of a bf16 word, which is then exactly value(code) * 2^-126;
the two codes with e = 0 (0 and 0.5) land on bf16 subnormals. Multiplying by bf16(s_b * 2^118) gives
value * s_b * 2^-8 exactly (value * s_b has at most 6 significant bits and lies in [2^-10, 2688]); the remaining
2^8 goes into the fp32 epilogue with the global scale. 2^118 rather than 2^126 because 448 * 2^126 overflows
bf16. This needs the bf16 multiply to keep subnormal inputs, which sm90's `mul.bf16x2` does (verified for every
code and every E4M3 scale by tests/gpu); XLA:CPU flushes them, so the jnp twin `decode_jnp` computes the same
values in fp32 instead.

`decode_tile_mgpu` is the register-level version (inside `plgpu.inline_mgpu`); `decode_jnp` is the plain-jnp
version used by GPU interpret mode on the CPU and by the tests.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np


@dataclasses.dataclass(frozen=True)
class DecodeVariant:
    name: str
    scale_fold: float      # the kernel multiplies the E4M3 block scale by this before the bf16 multiply
    epilogue_fold: float   # ... and the fp32 accumulator by this (with the global scale)


SUBNORMAL = DecodeVariant("subnormal", 2.0 ** 118, 2.0 ** 8)    # the kernel's decode
EXACT = DecodeVariant("exact", 1.0, 1.0)                       # value * s_b, no fold (activations, tests)


def unpack_codes(packed: jax.Array) -> jax.Array:
    """uint8 [..., K/2] -> int32 [..., K] codes 0..15 (element 2j from the low nibble)."""
    p = packed.astype(jnp.int32)
    codes = jnp.stack([p & 0xF, (p >> 4) & 0xF], axis=-1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def e2m1_value(codes: jax.Array) -> jax.Array:
    """int codes 0..15 -> fp32 e2m1 values (arithmetic, no table: usable inside a kernel body)."""
    mag = codes & 7
    e = mag >> 1
    half_m = (mag & 1).astype(jnp.float32) * 0.5
    v = jnp.where(e == 0, half_m, (1.0 + half_m) * ((1 << e) >> 1).astype(jnp.float32))
    return jnp.where(codes >= 8, -v, v)


def decode_jnp(packed: jax.Array, block_scale: jax.Array, variant: DecodeVariant) -> jax.Array:
    """uint8 [..., K/2], e4m3 [..., K/16] -> bf16 [..., K] = value * s_b / epilogue_fold, exactly.

    Same values as the in-kernel decode followed by the scale multiply, computed without subnormals (XLA:CPU
    flushes them) so that interpret mode and the tests see the GPU's numbers.
    """
    vals = e2m1_value(unpack_codes(packed))
    s = jnp.repeat(block_scale.astype(jnp.float32), 16, axis=-1)
    return (vals * s / variant.epilogue_fold).astype(jnp.bfloat16)


# ------------------------------------------------------------------------------------------------------------
# Register-level decode for the Hopper kernel (Mosaic GPU, inside `plgpu.inline_mgpu`).
#
# The packed tile [64, 256] (int4 view of the uint8 codes) is loaded in the WGMMA_UPCAST_4X layout: each thread
# holds, for its rows r and r + 8, one 32-bit word per 32-column group t with the 8 consecutive codes
# k = 32t + 8q .. 32t + 8q + 7 (q = lane % 4). All 8 codes share one block scale, so the scale multiply is four
# `mul.bf16x2` by one broadcast register.
#
# Permuted K (decode sizes): register j of a word holds codes j and j + 4, which already sit 16 bits apart, one
# in each half: one mask, one multiply and one mask per register (`_spread_bits`), no nibble split and no byte
# permute. The four registers are placed where the WGMMA register layout keeps 8-column tiles 4t..4t+3 of the
# thread's rows, i.e. the operand is the weight with its K axis permuted inside every 32-column group: operand
# column 32t + 8j + 2q + b holds weight column 32t + 8q + 4b + j. The activation tile must be permuted the same way
# (`k_permutation`), which costs nothing where the activation is gathered anyway (the MoE path) and one pass over
# x otherwise. Skipping the register relayout that the natural order would need is what makes the decode cheap.
# (Until 2026-12-04 register j held codes 2j, 2j + 1, which took a nibble split, a prmt, a multiply and a mask per
# register: 11 integer-pipe instructions per word where this takes 9, the decode being bound by sm90's
# half-rate integer pipe: benchmarks/RESULTS.md, fifteenth session.)
#
# Natural K (prefill): the codes are first relaid so that register j holds the adjacent codes 2j, 2j + 1
# (`_pair_bits`) and K keeps its order.

def k_permutation(k: int) -> np.ndarray:
    """Column order of the activation that matches the kernel's permuted-K weight operand: x_perm = x[:, perm].
    Operand column 32t + 8j + 2q + b holds weight column 32t + 8q + 4b + j."""
    c = np.arange(k)
    t, j, q, b = c // 32, (c // 8) % 4, (c // 2) % 4, c % 2
    return (32 * t + 8 * q + 4 * b + j).astype(np.int32)


def permute_k(a: jax.Array) -> jax.Array:
    """a [..., K] -> a[..., k_permutation(K)] with reshapes only (no index constant; usable in kernels)."""
    *lead, k = a.shape
    a = a.reshape(*lead, k // 32, 4, 2, 4)                  # (t, q, b, j)
    return jnp.moveaxis(a, -1, -3).reshape(*lead, k)       # (t, j, q, b)


def permute_activation(a: jax.Array) -> jax.Array:
    """`permute_k` of a 16-bit activation [M, K] in XLA, the fast way: on uint32 pairs of columns [M, K/2]. Each
    output pair (b = 0, 1) of (j, q) takes one 16-bit half from each of two input pairs, so the permutation is a
    stack of masks and shifts of strided slices, one loop fusion (XLA's transpose of the 16-bit form ran at
    0.21 TB/s, the uint32 form of the previous permutation at 3-4.7 TB/s: 384-4032 rows x 4096, H200,
    benchmarks/moe_kernels.py --sections permute, 2026-12-02)."""
    m, k = a.shape
    if jnp.dtype(a.dtype).itemsize != 2 or k % 32:
        return permute_k(a)
    u = lax.bitcast_convert_type(a.reshape(m, k // 2, 2), jnp.uint32).reshape(m, k // 32, 4, 2, 2)  # (t, q, b, jp)
    lo, hi = jnp.uint32(0xFFFF), jnp.uint32(0xFFFF0000)
    outs = []
    for jp in range(2):
        a0, a1 = u[..., 0, jp], u[..., 1, jp]             # [M, K/32, 4 (q)]: columns (j = 2jp, 2jp + 1) of b = 0, 1
        outs.append((a0 & lo) | (a1 << 16))               # j = 2jp: the low halves
        outs.append((a0 >> 16) | (a1 & hi))               # j = 2jp + 1: the high halves
    u = jnp.stack(outs, axis=-2)                                                                      # (t, j, q)
    return lax.bitcast_convert_type(u.reshape(m, k // 2), a.dtype).reshape(m, k)


def decode_tile_mgpu(w_ref, s_ref, variant: DecodeVariant, natural_k: bool = False, k_half: int | None = None,
                     raw: bool = False):
    """Inside inline_mgpu: int4 SMEM tile [64, 256] (tiled (8, 256), swizzle 128) + E4M3 scales [64, 16] ->
    bf16 FragmentedArray [64, 256] in WGMMA layout = value * s_b * 2^-8 (k_half 0/1: only columns
    [128 * k_half, 128 * k_half + 128), a [64, 128] array; permuted K only).

    natural_k=False: K permuted as in `k_permutation` (no register relayout; the activation is permuted instead).
    natural_k=True: the int4 codes are first relaid into the WGMMA layout (a quad transpose of bytes: two
    shuffles and a few prmt per 8 codes) so K keeps its natural order and the activation is used as is.
    raw=True (timing diagnostics only, wrong values): each code word bitcast to bf16x2 and used for all four
    registers it would decode into; the SMEM load of the codes stays, the decode and the scales go.
    """
    from jax.experimental.mosaic.gpu import utils
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, vector

    if variant.name != "subnormal":
        raise NotImplementedError("the register decode implements the 'subnormal' variant")
    if k_half is not None and (natural_k or k_half not in (0, 1)):
        raise NotImplementedError("k_half decodes a column half of the permuted-K operand only")
    groups = range(8) if k_half is None else range(4 * k_half, 4 * k_half + 4)    # 32-column groups t
    i32 = ir.IntegerType.get_signless(32)
    i8 = ir.IntegerType.get_signless(8)
    bf16 = ir.BF16Type.get()
    c32 = lambda v: arith.constant(i32, ir.IntegerAttr.get(i32, v if v < 2**31 else v - 2**32))

    codes = fa.FragmentedArray.load_tiled(w_ref, swizzle=128, is_signed=True, layout=fa.WGMMA_LAYOUT_UPCAST_4X)
    if natural_k:
        regs = codes.to_layout(fa.WGMMA_LAYOUT).registers    # [1, 32 (T), 1, 1, 2 (h), ...] vector<2xi4>
        assert regs.shape == (1, 32, 1, 1, 2, 1, 1, 1, 1), regs.shape
        # Column tiles 4t..4t+3 of a row came out of one 32-bit register: byte j = tile 4t + j.
        word = lambda t, h: utils.bitcast(utils.vector_concat(
            [regs[0, 4 * t + j, 0, 0, h, 0, 0, 0, 0] for j in range(4)]), i32)
    else:
        regs = codes.registers                               # [1, 8 (t), 1, 1, 2 (h), ...] vector<8xi4>
        assert regs.shape == (1, 8, 1, 1, 2, 1, 1, 1, 1), regs.shape
        word = lambda t, h: utils.bitcast(regs[0, t, 0, 0, h, 0, 0, 0, 0], i32)

    v2bf16 = ir.VectorType.get((2,), bf16)
    out = np.empty((1, 4 * len(groups), 1, 1, 2, 1, 1, 1, 1), dtype=object)
    if raw:
        for ti, t in enumerate(groups):
            for h in range(2):
                v = utils.bitcast(word(t, h), v2bf16)
                for j in range(4):
                    out[0, 4 * ti + j, 0, 0, h, 0, 0, 0, 0] = v
        return fa.FragmentedArray(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

    # Scales: thread rows r = 16 * warp + lane // 4 + 8 h. Permuted K: the word of group t holds block
    # 2t + q // 2 (q = lane % 4). Natural K: bytes 0, 1 of the word are in block 2t, bytes 2, 3 in 2t + 1.
    tid = arith.remui(utils.thread_idx(), c32(128))
    lane = arith.remui(tid, c32(32))
    row0 = arith.addi(arith.muli(arith.divui(tid, c32(32)), c32(16)), arith.divui(lane, c32(4)))
    q_hi = arith.divui(arith.remui(lane, c32(4)), c32(2))                        # q // 2
    # Permuted K: the selector that brings this thread's two scale bytes (0, 2 or 1, 3) of a word to the low half.
    pick = arith.addi(c32(0x5420), arith.muli(q_hi, c32(0x11)))
    base = utils.memref_ptr(s_ref)
    v4i32 = ir.VectorType.get((4,), i32)
    m_lo = c32(0x0FFF0FFF)
    fold = c32(0x73007300)                    # bf16 exponent offset: f16 -> bf16 (+112) and * 2^118
    cvt = "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $1; cvt.rn.f16x2.e4m3x2 $0, lo; }"
    scales = {}                               # (t, h, j) -> bf16x2 register (s, s)
    for h in range(2):
        row = arith.addi(row0, c32(8 * h))
        words = llvm.load(v4i32, utils.getelementptr(base, [arith.muli(row, c32(16))], i8))  # 16 B per row
        for wi in range(4):                   # scale word wi holds blocks 4wi .. 4wi+3
            wv = vector.extract(words, dynamic_position=[], static_position=[wi])
            if natural_k:
                for half, t in ((0x10, 2 * wi), (0x32, 2 * wi + 1)):
                    pair = utils.prmt(wv, wv, c32(0x5400 | half))    # (s_2t, s_2t+1) in the low 16 bits
                    b2 = arith.addi(arith.andi(arith.shrui(utils.inline_ptx(cvt, pair, result_types=i32),
                                                           c32(3)), m_lo), fold)
                    lo, hi = utils.prmt(b2, b2, c32(0x1010)), utils.prmt(b2, b2, c32(0x3232))
                    for j in range(4):
                        scales[(t, h, j)] = utils.bitcast(lo if j < 2 else hi, v2bf16)
            else:
                pair = utils.prmt(wv, wv, pick)
                b2 = utils.bitcast(_scale_pair_bits(utils.inline_ptx(cvt, pair, result_types=i32), c32, arith),
                                   v2bf16)
                for t, half in ((2 * wi, 0), (2 * wi + 1, 1)):
                    # A broadcast half (PTX mov {h, h}) that ptxas folds into the multiply's operand (.H0_H0 /
                    # .H1_H1), where a prmt would be an instruction of its own.
                    sc = vector.broadcast(v2bf16, vector.extract(b2, dynamic_position=[], static_position=[half]))
                    for j in range(4):
                        scales[(t, h, j)] = sc

    spread = _pair_bits if natural_k else _spread_bits
    for ti, t in enumerate(groups):
        for h in range(2):
            bits = spread(word(t, h), c32, arith, utils)
            for j in range(4):
                v = utils.bitcast(bits[j], v2bf16)                       # value * 2^-126 (bf16 pair)
                out[0, 4 * ti + j, 0, 0, h, 0, 0, 0, 0] = arith.mulf(v, scales[(t, h, j)])
    return fa.FragmentedArray(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=None)


def _scale_pair_bits(f16x2, c32, arith):
    """Two E4M3 block scales as f16x2 (cvt.rn.f16x2.e4m3x2) -> bf16x2 bits of s * 2^118 (permuted-K path): shift
    the f16 fields into bf16 position, add the exponent offset (+112 for f16 -> bf16, +118 for the fold). No mask:
    the bits the shift brings into the low half are the high f16's mantissa bits 0..2, zero for every E4M3 value
    (3 mantissa bits), and the sign bits are zero for the non-negative scales every quantizer writes."""
    return arith.addi(arith.shrui(f16x2, c32(3)), c32(0x73007300))


def _spread_bits(w, c32, arith, utils):
    """Codes j, j+4 of the word w -> register j's bf16x2 bit pattern (j = 0..3; sign at bits 15/31, e1 e0 m at
    bits 8-6 / 24-22). Codes j and j + 4 are 16 bits apart: masking them leaves one code at bits 4i..4i+3 of each
    half (i = j % 2; codes 2, 3, 6, 7 after one shift of the word by 8), and the multiply by 2^(6-4i) + 2^(12-4i)
    puts a copy at bits 6-9 and one at 12-15 (22-25, 28-31) that cannot overlap or carry; the last mask keeps
    e1 e0 m of the first copy and the sign of the second. 9 integer-pipe instructions per word (the multiplies
    are IMADs on the FMA pipe)."""
    w2 = arith.shrui(w, c32(8))
    out = []
    for j in range(4):
        src = w if j < 2 else w2
        mask, mult = (0x000F000F, 0x1040) if j % 2 == 0 else (0x00F000F0, 0x0104)
        out.append(arith.andi(arith.muli(arith.andi(src, c32(mask)), c32(mult)), c32(0x81C081C0)))
    return out


def _pair_bits(w, c32, arith, utils):
    """Codes 2j, 2j+1 of the word w -> register j's bf16x2 bit pattern (sign at bits 15/31, e1 e0 m at bits 8-6 /
    24-22). Per pair prmt, mul, and (3 instructions, plus 3 per word to split the nibbles); the first version
    used prmt + 2 shifts + 2 ands + or and was 3-6% slower (benchmarks/RESULTS.md, 2026-12-02).

    lo/hi hold the even/odd codes of w, one per byte (high nibbles zero). The prmt builds cw = code 2j in bits
    0-3 and code 2j+1 in bits 16-19, everything else zero (selector nibble 8 replicates the top bit of a byte of
    `lo`, which is 0). cw * (2^6 + 2^12) puts a copy of each code at bits 6-9 and one at 12-15 (22-25, 28-31):
    the copies cannot overlap, so there is no carry, and the mask keeps e1 e0 m from the first copy and the
    sign from the second."""
    lo = arith.andi(w, c32(0x0F0F0F0F))
    hi = arith.andi(arith.shrui(w, c32(4)), c32(0x0F0F0F0F))
    out = []
    for j in range(4):
        cw = utils.prmt(lo, hi, c32(j | 0x80 | ((4 + j) << 8) | 0x8000))
        out.append(arith.andi(arith.muli(cw, c32(0x1040)), c32(0x81C081C0)))
    return out
