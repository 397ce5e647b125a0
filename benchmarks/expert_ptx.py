"""The PTX of the routed-expert kernels for an H200, from a compile on a machine without a GPU.

Compiles `fused_moe.moe_experts` at V4-Flash shapes (256 experts, hidden 4096, intermediate 2048, top-6) for T
tokens against a described H200 (deviceless AOT, as `decode_launches.py`), has Mosaic GPU dump each kernel's PTX,
and prints per kernel the instructions that carry the FP4 decode and the MMA. Use it to check a kernel change
before spending device time on it: that an option changes the PTX (or leaves it bit-identical, `--diff`), or what
a decode step costs in instructions.

    pip install --no-deps --target .carry/cudaplug jax-cuda13-plugin==0.11.2 jax-cuda13-pjrt==0.11.2
    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 PYTHONPATH=.carry/cudaplug:. PATH=/usr/local/cuda/bin:$PATH \\
        python benchmarks/expert_ptx.py [--tokens 1] [--prefetch-down on] [--out DIR] [--diff OTHER_DIR] [--sass]

`--sass` also assembles each PTX for sm_90a (ptxas) and disassembles it (nvdisasm: the CUDA toolkit's, or the copy
that ships in the triton wheel), and counts SASS instructions by the pipe they issue to. The FP4 decode is bound by
the integer pipe (16 lanes per SM sub-partition: two issue cycles per warp instruction), so its LOP3/PRMT/SHF count
is the number to lower (benchmarks/RESULTS.md, fifteenth session).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

# Instruction families of the kernels' hot loops (PTX mnemonics, counted where they start a statement).
FAMILIES = {
    "wgmma": r"wgmma\.mma_async",
    "ldmatrix": r"ldmatrix",
    "prmt": r"prmt\.b32",
    "mul.lo (nibble spread)": r"mul\.lo\.s32",
    "bf16x2 mul/fma (block scale)": r"(mul|fma)\.rn\.bf16x2",
    "e4m3 -> f16 cvt (scales)": r"cvt\.rn\.f16x2\.e4m3x2",
    "mbarrier wait": r"mbarrier\.try_wait",
    "TMA load": r"cp\.async\.bulk\.tensor",
    "L2 prefetch": r"cp\.async\.bulk\.prefetch\.L2",
    "PDL wait / trigger": r"griddepcontrol\.",
}


def compile_experts(tokens: int, prefetch_down: bool | None, dump_dir: str) -> None:
    """Compile the routed-expert block for an H200 with Mosaic GPU's PTX dump going to dump_dir."""
    os.makedirs(dump_dir, exist_ok=True)       # Mosaic GPU prints to stdout when the folder is missing
    os.environ["MOSAIC_GPU_DUMP_PTX"] = "1"
    os.environ["MOSAIC_GPU_DUMP_TO"] = dump_dir
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    from benchmarks.decode_launches import H200_TARGET
    from megamoe_jax.quant.nvfp4 import NVFP4Tensor
    from pallas_kernels import dispatch, fused_moe
    from pallas_kernels import grouped_matmul as gm

    dev = topologies.get_topology_desc("h200", "cuda", target_config=H200_TARGET, topology="1x1x1").devices[0]
    dispatch.kernels_enabled = lambda: True     # the process has no GPU: take the Hopper paths
    gm._num_sms = lambda: 132                   # H200
    sharding = jax.sharding.SingleDeviceSharding(dev)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    e, d, i, k = 256, 4096, 2048, 6

    def weight(n, kk):
        return NVFP4Tensor(spec((e, n, kk // 2), jnp.uint8), spec((e, n, kk // 16), jnp.float8_e4m3fn),
                           spec((e, 1), jnp.float32))
    f = jax.jit(lambda x, w1, w3, w2, idx, tw: fused_moe.moe_experts(x, w1, w3, w2, idx, tw, 10.0,
                                                                     prefetch_down=prefetch_down))
    f.lower(spec((tokens, d), jnp.bfloat16), weight(i, d), weight(i, d), weight(d, i),
            spec((tokens, k), jnp.int32), spec((tokens, k), jnp.float32)).compile()


# SASS opcodes by the sm90 pipe that executes them (the ones the expert kernels' inner loops use).
SASS_PIPES = {
    "integer (ALU)": ("LOP3", "PRMT", "SHF", "IADD3", "LEA", "SEL", "ISETP", "VIADD", "IABS", "FLO", "POPC"),
    "FMA (IMAD, HMUL2, ...)": ("IMAD", "HMUL2", "HFMA2", "HADD2", "FFMA", "FMUL", "FADD"),
    "conversion": ("F2FP", "F2F", "I2F", "F2I"),
    "shared memory": ("LDS", "LDSM", "STS"),
    "tensor core": ("HGMMA",),
    "TMA": ("UTMALDG", "UTMASTG", "UBLKCP"),
}


def sass_counts(sass: str) -> dict[str, int]:
    """Static count of the SASS instructions of each pipe in `nvdisasm` output (predicates and modifiers
    ignored: `@!P0 LOP3.LUT R1, ...` counts as LOP3)."""
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    out = {pipe: 0 for pipe in SASS_PIPES}
    for op in ops:
        for pipe, names in SASS_PIPES.items():
            if op in names:
                out[pipe] += 1
    out["all"] = len(ops)
    return out


def _nvdisasm() -> str | None:
    import shutil
    found = shutil.which("nvdisasm")
    if found:
        return found
    try:
        import triton
        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
        return cand if os.path.exists(cand) else None
    except ImportError:
        return None


def kernel_sass(dump_dir: str) -> dict[str, str]:
    """name -> SASS text of each dumped PTX (ptxas -arch=sm_90a -O3, then nvdisasm)."""
    import shutil
    import subprocess
    ptxas, nvdisasm = shutil.which("ptxas"), _nvdisasm()
    if not ptxas or not nvdisasm:
        sys.exit(f"--sass needs ptxas and nvdisasm (found {ptxas!r}, {nvdisasm!r})")
    out = {}
    for name in sorted(f for f in os.listdir(dump_dir) if f.endswith(".ptx")):
        cubin = os.path.join(dump_dir, name[:-4] + ".cubin")
        subprocess.run([ptxas, "-arch=sm_90a", "-O3", os.path.join(dump_dir, name), "-o", cubin], check=True)
        out[name] = subprocess.run([nvdisasm, "-c", cubin], check=True, capture_output=True, text=True).stdout
    return out


def kernel_ptx(dump_dir: str) -> dict[str, str]:
    """name -> PTX text without line information (`.loc`, `.file`), so that two compiles compare as code."""
    out = {}
    for name in sorted(f for f in os.listdir(dump_dir) if f.endswith(".ptx")):
        with open(os.path.join(dump_dir, name)) as fh:
            out[name] = "".join(l for l in fh if not re.match(r"\s*\.(loc|file)\b", l))
    return out


def counts(ptx: str) -> dict[str, int]:
    """Occurrences of each instruction family in the kernel's PTX (static counts: a loop body counts once)."""
    code = re.sub(r"//[^\n]*", "", ptx)
    return {fam: len(re.findall(r"\b" + pat, code)) for fam, pat in FAMILIES.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--prefetch-down", choices=("default", "on", "off"), default="default",
                    help="fused_moe.moe_experts' prefetch_down (default: fused_moe.PREFETCH_DOWN)")
    ap.add_argument("--sass", action="store_true", help="also count SASS instructions per pipe (ptxas, nvdisasm)")
    ap.add_argument("--ablate", default="", help="comma list for grouped_matmul.ABLATE (timing diagnostics)")
    ap.add_argument("--out", default=None, help="dump folder (default: a new temporary one)")
    ap.add_argument("--diff", default=None, help="another dump folder: report which kernels' PTX differ")
    args = ap.parse_args(argv)
    pf = {"default": None, "on": True, "off": False}[args.prefetch_down]
    out = args.out or tempfile.mkdtemp(prefix="expert_ptx_")
    if args.ablate:
        from pallas_kernels import grouped_matmul as gm
        gm.ABLATE = frozenset(args.ablate.split(","))
    compile_experts(args.tokens, pf, out)
    ptx = kernel_ptx(out)
    if not ptx:
        sys.exit(f"no PTX was dumped to {out} (is ptxas on PATH and the CUDA plugin importable?)")
    print(f"T = {args.tokens}, prefetch_down = {args.prefetch_down}: {len(ptx)} kernels, PTX in {out}")
    print("| kernel | lines | " + " | ".join(FAMILIES) + " |")
    print("|---|---|" + "---|" * len(FAMILIES))
    for name, text in ptx.items():
        c = counts(text)
        print(f"| {name} | {text.count(chr(10))} | " + " | ".join(str(c[f]) for f in FAMILIES) + " |")
    if args.sass:
        print("| kernel (SASS) | all | " + " | ".join(SASS_PIPES) + " |")
        print("|---|---|" + "---|" * len(SASS_PIPES))
        for name, text in kernel_sass(out).items():
            c = sass_counts(text)
            print(f"| {name} | {c['all']} | " + " | ".join(str(c[p]) for p in SASS_PIPES) + " |")
    if args.diff:
        other = kernel_ptx(args.diff)
        for name in sorted(set(ptx) | set(other)):
            same = ptx.get(name) == other.get(name)
            print(f"{name}: {'identical' if same else 'differs'} to {args.diff}")


if __name__ == "__main__":
    main()
