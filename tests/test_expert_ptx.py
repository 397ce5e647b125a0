"""CPU: benchmarks/expert_ptx.py's PTX reading (the compile itself needs the CUDA plugin and ptxas)."""
from benchmarks import expert_ptx

_PTX = """\t.loc\t1 755 4
\tand.b32 \t%r1220, %r1, 31;
\t{ .reg .b16 lo, hi; mov.b32 {lo, hi}, %r115; cvt.rn.f16x2.e4m3x2 %r118, lo; }
\tmul.lo.s32 \t%r377, %r142, 4160;
\tmul.rn.bf16x2 \t%r272, %r119, %r378;
\t// begin inline asm
\t@%p41 cp.async.bulk.prefetch.L2.global [%rd221], %r1209;
\t{ .reg .pred p; setp.ne.b32 p, 1, 0; wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%r1}, {%r2}, %rd33, p, 1, 1, 0; }
\t.file\t1 "/x/grouped_matmul.py"
"""


def test_counts_find_instructions_inside_inline_asm_and_predicates(tmp_path):
    (tmp_path / "kernel_0.ptx").write_text(_PTX)
    (tmp_path / "kernel_1.ptx").write_text(_PTX.replace("\t.loc\t1 755 4", "\t.loc\t1 9 9"))
    (tmp_path / "kernel_0.ptxas").write_text("not ptx")
    ptx = expert_ptx.kernel_ptx(str(tmp_path))
    assert sorted(ptx) == ["kernel_0.ptx", "kernel_1.ptx"]
    assert ptx["kernel_0.ptx"] == ptx["kernel_1.ptx"]            # line information does not count as code
    assert ".loc" not in ptx["kernel_0.ptx"] and ".file" not in ptx["kernel_0.ptx"]
    c = expert_ptx.counts(ptx["kernel_0.ptx"])
    assert c["wgmma"] == 1 and c["L2 prefetch"] == 1 and c["e4m3 -> f16 cvt (scales)"] == 1
    assert c["mul.lo (nibble spread)"] == 1 and c["bf16x2 mul/fma (block scale)"] == 1
    assert c["prmt"] == 0 and c["TMA load"] == 0


_SASS = """        /*0040*/                   PRMT R0, R4, 0x1010, R4 ;
        /*0050*/                   HMUL2.BF16_V2 R8, R5, R4.H0_H0 ;
        /*0060*/              @!P2 LOP3.LUT R9, R6, 0xf0f0f0f, RZ, 0xc0, !PT ;
        /*0070*/                   IMAD R65, R65, 0x1040, RZ ;
        /*0080*/                   HGMMA.64x8x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0090*/                   SYNCS.ARRIVE.TRANS64.A1T0 RZ, [UR24+0x8], RZ ;
"""


def test_sass_counts_group_opcodes_by_pipe():
    c = expert_ptx.sass_counts(_SASS)
    assert c["all"] == 6
    assert c["integer (ALU)"] == 2           # PRMT and the predicated LOP3
    assert c["FMA (IMAD, HMUL2, ...)"] == 2
    assert c["tensor core"] == 1 and c["TMA"] == 0
