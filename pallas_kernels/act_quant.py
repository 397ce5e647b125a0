"""NVFP4 activation quantizer: x [T, K] -> packed e2m1 codes uint8 [T, K/2] + E4M3 block scales [T, K/16].

Numerics are `megamoe_jax.quant.nvfp4.quantize` with a given global scale (compressed-tensors bit for bit):
    r_b = vecmax_b / 6 (rounded to bf16 for bf16 input),  s_b = E4M3_RNE(min(G * r_b, 448)), 0 -> 0.125,
    code = E2M1_RNE(clip(fl32(x / fl32(s_b / G)), -6, 6)),  G = 1 / g (the global scale is the dequant factor g)
Saturating: anything beyond the calibrated amax becomes +-6, never NaN; a NaN input gives its block a NaN scale.

Two implementations of the same function:
* `_quantize_mgpu`, the Hopper kernel (Mosaic GPU, one pass over HBM, bf16 input): each thread owns whole
  16-element blocks. It loads a block as eight bf16x2 words, takes the NaN-propagating max of |x| with packed
  bf16 max, computes the scale byte with IEEE-exact PTX (`div.rn.f32`, `cvt.rn.bf16.f32`, `mul.rn.f32`,
  `cvt.rn.satfinite.e4m3x2.f32`), and then never divides: the byte selects a row of the exact code thresholds
  X_i of `nvfp4.code_thresholds` (for bf16 input, |x| >= X_i  <=>  |x| >= ceil_bf16(X_i)), and each pair of
  codes is a count of packed bf16 compares (`set.ge.bf16x2` + `fma.rn.bf16x2`, two elements per instruction).
  Output: the packed codes and scale bytes ("codes"), or, for the W4A4 matmuls, the exact bf16 values
  value(code) * s_b ("values": the same compares accumulate s_b-scaled e2m1 steps, every partial sum exact),
  optionally with each block's max |x| so the row amax for calibration costs 1/16 of the input's bytes.
* the XLA path (`megamoe_jax.quant.nvfp4`), used for other inputs (fp32/fp16, CPU, non-Hopper GPUs).
GPU tests (tests/gpu/test_act_quant_gpu.py) require identical bytes from both.

The W4A4 grouped matmul does not need the packed bytes, only the exact dequantized values value(code) * s_b
(<= 6 significant bits: exact in bf16); `quantize_dequantize_grouped` returns those, with the activation's
global scale left to the matmul's fp32 epilogue.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from megamoe_jax.quant import nvfp4
from megamoe_jax.quant.floatbits import f32_bits
from pallas_kernels import reference as _reference

_THREADS = 128                 # one warpgroup per CTA
_TABLE_WORDS = 128 * 8         # per multiplier: 128 scale bytes x 8 thresholds, each a duplicated bf16 pair


@dataclasses.dataclass(frozen=True)
class Config:
    """blocks_per_thread: 16-element blocks each thread loads before computing (bytes in flight per SM)."""
    blocks_per_thread: int = 4

    def __post_init__(self):
        if not 1 <= self.blocks_per_thread <= 16:
            raise ValueError(f"blocks_per_thread must be in [1, 16], got {self.blocks_per_thread}")


# ------------------------------------------------------------------------------------------------------------
# Public entry points

def quantize(x: jax.Array, global_scale: jax.Array, *, with_amax: bool = False, multiplier=None):
    """x [T, K] (bf16/f32), g () or [T] -> (packed uint8 [T, K/2], block_scale e4m3 [T, K/16][, amax [T]]).

    with_amax also returns the per-row amax of x (fp32; NaN propagates; the per-tensor amax is its max) for
    calibration. `multiplier` (same shape as g) is a stored compressed-tensors G used exactly instead of
    fl32(1/g).
    """
    _check_x(x, "act_quant.quantize")
    G = _multiplier(global_scale, multiplier)
    G = G.reshape(()) if G.size == 1 else G                            # per-tensor: one threshold table
    if use_kernel(x) and G.ndim == 0:
        packed, byte, vmax = _quantize_mgpu(x, G[None], None, "codes", with_amax, Config())
        amax = _row_amax(vmax) if with_amax else None
    else:
        packed, byte = nvfp4.quantize_with_multiplier(x, G)
        amax = nvfp4.row_amax(x) if with_amax else None
    scale = jax.lax.bitcast_convert_type(byte, jnp.float8_e4m3fn)
    return (packed, scale, amax) if with_amax else (packed, scale)


def quantize_dequantize_grouped(x: jax.Array, input_scale: jax.Array, group_sizes: jax.Array | None,
                                interpret: bool = False, multiplier=None, gid: jax.Array | None = None) -> jax.Array:
    """W4A4 activation for a grouped matmul: rows of x [M, K] quantized with g_a of their group ([E] or ()).

    The group of each row comes from sorted `group_sizes`, or from `gid` [M] (rows in any order) when given.

    Returns bf16 value(code) * s_b (exact), i.e. the dequantized activation divided by g_a; the matmul applies
    g_a in its epilogue. Rows past sum(group_sizes) use the last group's scale (their output is zero anyway).
    """
    del interpret  # the jnp path runs everywhere (interpret mode included)
    _check_x(x, "act_quant.quantize_dequantize_grouped")
    m = x.shape[0]
    G = _multiplier(input_scale, multiplier).reshape(-1)                          # [E] or [1]
    if G.shape[0] == 1:
        gid = None
    elif gid is not None:
        gid = jnp.clip(gid.astype(jnp.int32), 0, G.shape[0] - 1)
    else:
        ends = jnp.cumsum(group_sizes)
        gid = jnp.minimum(jnp.searchsorted(ends, jnp.arange(m), side="right", method="compare_all"),
                          G.shape[0] - 1).astype(jnp.int32)
    if use_kernel(x):
        return _quantize_mgpu(x, G, gid, "values", False, Config())[0]
    from pallas_kernels import nvfp4_decode
    packed, byte = (nvfp4.quantize_with_multiplier(x, G[0]) if gid is None else
                    nvfp4.quantize_grouped_with_multiplier(x, G, gid))
    return nvfp4_decode.decode_jnp(packed, jax.lax.bitcast_convert_type(byte, jnp.float8_e4m3fn),
                                   nvfp4_decode.EXACT)


def reference(x: jax.Array, global_scale: jax.Array) -> jax.Array:
    """The activation a W4A4 matmul sees (fp32 x_hat = value * s_b * g), from pallas_kernels/reference.py."""
    return _reference.quantize_activation(x, global_scale)


def use_kernel(x) -> bool:
    """The Hopper kernel takes bf16 [T, K] with K % 16 == 0 and T > 0 when the kernels are enabled."""
    from pallas_kernels import dispatch
    return (x.dtype == jnp.bfloat16 and x.ndim == 2 and x.shape[0] > 0 and x.shape[1] % 16 == 0
            and dispatch.kernels_enabled())


def _check_x(x, what):
    if x.ndim != 2:
        raise ValueError(f"{what}: x must be [T, K], got shape {tuple(x.shape)}")
    if x.shape[1] % 16:
        raise ValueError(f"{what}: K={x.shape[1]} must be a multiple of 16 (NVFP4 blocks; no padding)")


def _multiplier(global_scale, multiplier) -> jax.Array:
    """G (f32, g's shape): the stored multiplier if given, else fl32(1/g) (invalid g -> 1, never NaN)."""
    if multiplier is not None:
        return jnp.asarray(multiplier, jnp.float32)
    return nvfp4.multiplier_from_g(jnp.asarray(global_scale, jnp.float32))


def _row_amax(vmax_bits: jax.Array) -> jax.Array:
    """Per-block max |x| as bf16 bits uint16 [T, K/16] -> row amax f32 [T] (NaN propagates)."""
    return jnp.max(jax.lax.bitcast_convert_type(vmax_bits, jnp.bfloat16).astype(jnp.float32), axis=-1)


# ------------------------------------------------------------------------------------------------------------
# Threshold tables (XLA, tiny: 4 KB per multiplier)

@jax.jit
def threshold_table(multiplier: jax.Array) -> jax.Array:
    """uint32 [n, 128, 8]: for each multiplier G and scale byte, the 7 magnitude thresholds and the sign
    threshold of `nvfp4.code_thresholds`, rounded UP to bf16 (exact for bf16 inputs) and duplicated into both
    halves of a word, so the kernel compares bf16 pairs directly. NaN rows (byte 0x7F) stay NaN: no compare
    passes, every code is 0 (the block's NaN scale carries the NaN)."""
    bits = f32_bits(nvfp4.code_thresholds(jnp.asarray(multiplier, jnp.float32).reshape(-1)))
    up = jnp.where(bits > 0x7F800000, jnp.uint32(0x7FC0), (bits + jnp.uint32(0xFFFF)) >> 16)
    return up | (up << 16)


# ------------------------------------------------------------------------------------------------------------
# The kernel

def _quantize_mgpu(x, G, gid, mode: str, with_vmax: bool, cfg: Config):
    """x bf16 [T, K]; G f32 [n] multipliers; gid int32 [T] (row -> multiplier) or None (n == 1).

    mode "codes" -> (packed uint8 [T, K/2], scale bytes uint8 [T, K/16], block max |x| uint16 [T, K/16] | None);
    mode "values" -> (bf16 [T, K] value(code) * s_b, None, None).
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    t, k = x.shape
    nb = t * k // 16
    bpt = cfg.blocks_per_thread
    grid = -(-nb // (_THREADS * bpt))
    per_row_table = gid is not None
    tables = threshold_table(G)                                                  # [n, 128, 8] u32
    if mode == "codes":
        out_type = [jax.ShapeDtypeStruct((t, k // 2), jnp.uint8), jax.ShapeDtypeStruct((t, k // 16), jnp.uint8)]
        if with_vmax:
            out_type.append(jax.ShapeDtypeStruct((t, k // 16), jnp.uint16))
    elif mode == "values":
        out_type = [jax.ShapeDtypeStruct((t, k), jnp.bfloat16)]
    else:
        raise ValueError(f"mode must be 'codes' or 'values', got {mode!r}")
    n_in = 4 if per_row_table else 3
    body = _body(nb, k // 16, bpt, mode, with_vmax, per_row_table, n_in, len(out_type))
    kernel = plgpu.kernel(body, out_type=tuple(out_type), grid=(grid,), grid_names=("cta",),
                          compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane))
    args = (x, tables, G.astype(jnp.float32)) + ((gid.astype(jnp.int32),) if per_row_table else ())
    outs = kernel(*args)
    outs = list(outs) + [None] * (3 - len(outs))
    return tuple(outs)


def _body(nb, blocks_per_row, bpt, mode, with_vmax, per_row_table, n_in, n_out):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def body(*refs):
        @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * (n_in + n_out))
        def per_thread(ctx, *raw):
            del ctx
            _thread_code(raw[:n_in], raw[n_in:], nb, blocks_per_row, bpt, mode, with_vmax, per_row_table)

        per_thread(*refs)

    return body


# PTX of one block. Inputs $w0..$w7: the 16 bf16 of the block as pairs (element 2j in the low half of word j);
# $G the f32 multiplier; $tab the global address of the multiplier's threshold table. Outputs: the 8 code words
# (mode "values": bf16 pairs) or 2 packed-code words, the scale byte, and the block's max |x| (bf16 bits).
_PTX_SCALE = """
and.b32 a0, $W0, 0x7FFF7FFF; and.b32 a1, $W1, 0x7FFF7FFF; and.b32 a2, $W2, 0x7FFF7FFF; and.b32 a3, $W3, 0x7FFF7FFF;
and.b32 a4, $W4, 0x7FFF7FFF; and.b32 a5, $W5, 0x7FFF7FFF; and.b32 a6, $W6, 0x7FFF7FFF; and.b32 a7, $W7, 0x7FFF7FFF;
max.NaN.bf16x2 m0, a0, a1; max.NaN.bf16x2 m1, a2, a3; max.NaN.bf16x2 m2, a4, a5; max.NaN.bf16x2 m3, a6, a7;
max.NaN.bf16x2 m0, m0, m1; max.NaN.bf16x2 m2, m2, m3; max.NaN.bf16x2 m0, m0, m2;
shr.b32 m1, m0, 16; max.NaN.bf16x2 m0, m0, m1; and.b32 vm, m0, 0xFFFF;
setp.gt.u32 pnan, vm, 0x7F80; setp.eq.u32 pinf, vm, 0x7F80;
shl.b32 m1, vm, 16; mov.b32 fv, m1;
div.rn.f32 fr, fv, 0f40C00000;
cvt.rn.bf16.f32 h, fr; cvt.f32.bf16 fr, h;
mul.rn.f32 fs, $G, fr; min.f32 fs, fs, 0f43E00000; selp.f32 fs, 0f43E00000, fs, pinf;
cvt.rn.satfinite.e4m3x2.f32 h, fs, fs; cvt.u32.u16 sb, h; and.b32 sb, sb, 0xFF;
setp.eq.u32 pz, sb, 0; selp.b32 sb, 0x20, sb, pz; selp.b32 sb, 0x7F, sb, pnan;
cvt.u64.u32 off, sb; shl.b64 off, off, 5; add.u64 off, off, $TAB;
ld.global.nc.v4.u32 {t0, t1, t2, t3}, [off]; ld.global.nc.v4.u32 {t4, t5, t6, tn}, [off+16];
"""

def _pair_ptx(j: int, steps: tuple[str, ...], base: str | None) -> str:
    """Pair j: the 7 packed compares |x| >= X_i, accumulated as acc = base + sum_i [|x| >= X_i] * steps[i]
    (codes: base 8, steps 1, so acc = bf16(8 + k); values: no base, steps = the e2m1 increments 0.5, 0.5, 0.5,
    0.5, 1, 1, 2 times s_b, so acc = value(k) * s_b, every partial sum exact), then c = the sign bits where x < 0
    and |x| >= X_neg (fl32(x / d) < 0)."""
    lines = []
    for i, step in enumerate(steps):
        lines.append(f"set.ge.bf16x2.bf16x2 c, a{j}, t{i};")
        if i == 0 and base is None:
            lines.append(f"mul.rn.bf16x2 acc, c, {step};")
        else:
            lines.append(f"fma.rn.bf16x2 acc, c, {step}, {base if i == 0 else 'acc'};")
    lines.append(f"set.ge.u32.bf16x2 c, a{j}, tn; and.b32 c, c, $W{j}; and.b32 c, c, 0x80008000;")
    return " ".join(lines)


# Codes: k sits at bits 4..6 of each bf16 half of 8 + k; with the sign at bit 3 that is the nibble, and byte 0 of
# q_j gets both nibbles of the pair (element 2j low).
_PACK_PAIR = ("shr.b32 acc, acc, 4; and.b32 acc, acc, 0x00070007; shr.b32 c, c, 12; or.b32 acc, acc, c; "
              "shr.b32 c, acc, 12; or.b32 q{j}, acc, c;")
_COUNT_STEPS = ("one",) * 7
_VALUE_STEPS = ("half",) * 4 + ("full",) * 2 + ("dbl",)


def block_ptx(mode: str) -> tuple[str, int]:
    """The PTX template of one block for `mode` and its number of outputs (before operand numbering)."""
    regs = (".reg .b32 a<8>, m<4>, vm, sb, t<7>, tn, c, acc, one, eight, half, full, dbl, q<8>; "
            ".reg .b16 h; .reg .f32 fv, fr, fs, fsb; .reg .b64 off; .reg .pred pnan, pinf, pz;")
    body = [regs, _PTX_SCALE]
    if mode == "codes":
        body.append("mov.b32 one, 0x3F803F80; mov.b32 eight, 0x41004100;")
        for j in range(8):
            body.append(_pair_ptx(j, _COUNT_STEPS, "eight") + " " + _PACK_PAIR.format(j=j))
        # byte j of the pair results holds codes 2j, 2j+1: gather them into two words
        body.append("prmt.b32 q0, q0, q1, 0x0040; prmt.b32 q2, q2, q3, 0x0040; prmt.b32 $P0, q0, q2, 0x5410;")
        body.append("prmt.b32 q4, q4, q5, 0x0040; prmt.b32 q6, q6, q7, 0x0040; prmt.b32 $P1, q4, q6, 0x5410;")
        outs = ["$P0", "$P1", "$SB", "$VM"]
    else:
        # s_b as bf16 (exact), and the e2m1 steps 0.5, 0.5, 0.5, 0.5, 1, 1, 2 times s_b (exact: powers of two)
        body.append("cvt.u16.u32 h, sb; cvt.rn.f16x2.e4m3x2 c, h; mov.b32 {h, _}, c; cvt.f32.f16 fsb, h; "
                    "cvt.rn.bf16x2.f32 full, fsb, fsb; mul.rn.f32 fsb, fsb, 0f3F000000; "
                    "cvt.rn.bf16x2.f32 half, fsb, fsb; add.f32 fsb, fsb, fsb; add.f32 fsb, fsb, fsb; "
                    "cvt.rn.bf16x2.f32 dbl, fsb, fsb;")
        for j in range(8):
            body.append(_pair_ptx(j, _VALUE_STEPS, None) + f" or.b32 $O{j}, acc, c;")
        outs = [f"$O{j}" for j in range(8)] + ["$SB", "$VM"]
    body.append("mov.b32 $SB, sb; mov.b32 $VM, vm;")
    text = "{\n" + "\n".join(body) + "\n}"
    # Number the operands: outputs first, then W0..W7, G, TAB (llvm.inline_asm's order).
    names = outs + [f"$W{j}" for j in range(8)] + ["$G", "$TAB"]
    for i, nm in sorted(enumerate(names), key=lambda p: -len(p[1])):
        text = text.replace(nm, f"%{i}")
    return text.replace("%", "$"), len(outs)


def _thread_code(ins, outs, nb, blocks_per_row, bpt, mode, with_vmax, per_row_table):
    """Per-thread MLIR: blocks b = (cta * bpt + j) * 128 + tid, j < bpt; loads first, then the PTX per block."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, gpu, llvm
    from jax.experimental.mosaic.gpu import utils

    i32 = ir.IntegerType.get_signless(32)
    i64 = ir.IntegerType.get_signless(64)
    f32 = ir.F32Type.get()
    gptr = llvm.PointerType.get(1)
    c32 = lambda v: arith.constant(i32, ir.IntegerAttr.get(i32, v))
    c64 = lambda v: arith.constant(i64, ir.IntegerAttr.get(i64, v))

    def gaddr(ref):
        return llvm.ptrtoint(i64, llvm.addrspacecast(gptr, utils.memref_ptr(ref)))

    x_ref, tab_ref, g_ref = ins[:3]
    x_base, tab_base, g_base = gaddr(x_ref), gaddr(tab_ref), gaddr(g_ref)
    row_base = gaddr(ins[3]) if per_row_table else None
    out_bases = [gaddr(r) for r in outs]

    def ld(fmt, addr, types):
        return utils.inline_ptx(fmt, addr, result_types=types)

    tid = arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x))
    cta = arith.index_cast(i32, gpu.block_id(gpu.Dimension.x))
    blocks, valids, words = [], [], []
    for j in range(bpt):
        b = arith.addi(arith.muli(arith.addi(arith.muli(cta, c32(bpt)), c32(j)), c32(_THREADS)), tid)
        valid = arith.cmpi(arith.CmpIPredicate.slt, b, c32(nb))
        b = arith.select(valid, b, c32(nb - 1))
        addr = arith.addi(x_base, arith.muli(arith.extui(i64, b), c64(32)))
        w = list(ld("ld.global.nc.L1::no_allocate.v4.u32 {$0, $1, $2, $3}, [$4];", addr, [i32] * 4))
        w += ld("ld.global.nc.L1::no_allocate.v4.u32 {$0, $1, $2, $3}, [$4+16];", addr, [i32] * 4)
        blocks.append(b)
        valids.append(valid)
        words.append(w)

    if not per_row_table:
        g0 = utils.inline_ptx("ld.global.nc.f32 $0, [$1];", g_base, result_types=f32)
    ptx, n_res = block_ptx(mode)
    for b, valid, w in zip(blocks, valids, words):
        if per_row_table:
            row = arith.divui(b, c32(blocks_per_row))
            tbl = ld("ld.global.nc.u32 $0, [$1];", arith.addi(row_base, arith.muli(arith.extui(i64, row), c64(4))), i32)
            tbl64 = arith.extui(i64, tbl)
            g = ld("ld.global.nc.f32 $0, [$1];", arith.addi(g_base, arith.muli(tbl64, c64(4))), f32)
            tab = arith.addi(tab_base, arith.muli(tbl64, c64(_TABLE_WORDS * 4)))
        else:
            g, tab = g0, tab_base
        res = utils.inline_ptx(ptx, *w, g, tab, result_types=[i32] * n_res)
        b64 = arith.extui(i64, b)
        if mode == "codes":
            p0, p1, sb, vm = res
            utils.inline_ptx("st.global.v2.u32 [$0], {$1, $2};",
                             arith.addi(out_bases[0], arith.muli(b64, c64(8))), p0, p1, predicate=valid)
            utils.inline_ptx("st.global.u8 [$0], $1;", arith.addi(out_bases[1], b64), sb, predicate=valid)
            if with_vmax:
                utils.inline_ptx("st.global.u16 [$0], $1;", arith.addi(out_bases[2], arith.muli(b64, c64(2))),
                                 arith.trunci(ir.IntegerType.get_signless(16), vm), predicate=valid)
        else:
            o = res[:8]
            addr = arith.addi(out_bases[0], arith.muli(b64, c64(32)))
            utils.inline_ptx("st.global.v4.u32 [$0], {$1, $2, $3, $4};", addr, *o[:4], predicate=valid)
            utils.inline_ptx("st.global.v4.u32 [$0+16], {$1, $2, $3, $4};", addr, *o[4:], predicate=valid)
