"""The kernels one decode step launches on an H200, from a compile on a machine without a GPU.

XLA compiles for a described GPU without one being attached (deviceless AOT: a PJRT topology from a target
config). The optimized HLO has the same fusions as on the device (checked 2026-12-01: the kernel names match a
CUPTI profile of `decode_profile.py` on an H200, which counted 344 kernels for a step without donation; the same
step compiled here launches 348). The state is donated here, as in the decode loop, which costs copies of the
state tensors that are rebuilt by gathers (359 launches at batch 1, 17 of them copies). Each launch of the
ENTRY computation is attributed to the source line most of its ops come from, so kernel-count work on the
decode step can be done on a CPU machine and timed on a GPU later.

Needs the CUDA plugin beside the project's jax (not a dependency; ~300 MB), and ptxas on PATH:

    pip install --no-deps --target .carry/cudaplug jax-cuda13-plugin==0.11.2 jax-cuda13-pjrt==0.11.2
    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 PYTHONPATH=.carry/cudaplug:. PATH=/usr/local/cuda/bin:$PATH \\
        python benchmarks/decode_launches.py [--batch 1] [--layers 4] [--hlo step.hlo] [--top 40]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import time

# H200 (sm90, 132 SMs); the fields XLA's fusion and tiling heuristics read.
H200_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 150000000000 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
runtime_version { major: 13 minor: 0 patch: 0 }
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 24 }
device_description_str: "NVIDIA H200"
"""
_OURS = ("mhc.py", "attention.py", "compressor.py", "indexer.py", "rope.py", "norms.py", "moe.py", "model.py",
         "dispatch.py", "fused_moe.py", "grouped_matmul.py", "act_quant.py", "reference.py", "state.py")
_NOT_LAUNCHES = ("parameter", "get-tuple-element", "tuple", "bitcast", "constant")


def compile_step(batch: int, layers: int, context: int) -> str:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.experimental import topologies

    from benchmarks.model_decode import slice_config
    from megamoe_jax import generate
    from megamoe_jax.model.model import DeepseekV4
    from megamoe_jax.quant.nvfp4 import NVFP4Tensor
    from pallas_kernels import dispatch

    dev = topologies.get_topology_desc("h200", "cuda", target_config=H200_TARGET, topology="1x1x1").devices[0]
    dispatch.kernels_enabled = lambda: True          # the process itself has no GPU: take the Hopper paths
    sharding = jax.sharding.SingleDeviceSharding(dev)

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    cfg = slice_config(layers)
    model = nnx.eval_shape(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    e, d, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    for blk in model.layers:                          # NVFP4 experts, as benchmarks/model_decode.py builds them
        for name, (n, k) in (("w1", (i, d)), ("w3", (i, d)), ("w2", (d, i))):
            setattr(blk.ffn.experts, name, nnx.Param(NVFP4Tensor(
                spec((e, n, k // 2), jnp.uint8), spec((e, n, k // 16), jnp.float8_e4m3fn),
                spec((e, 1), jnp.float32))))
    graphdef, params = nnx.split(model)
    state = jax.eval_shape(lambda: model.init_state(batch, context + 64))
    params, state = (jax.tree.map(lambda a: spec(a.shape, a.dtype), t) for t in (params, state))

    def step(params, st, ids, lengths):
        logits, st = generate._forward(graphdef, params, ids, st, lengths)
        return jnp.argmax(logits[:, -1], axis=-1), st

    # The state is donated, as in the production decode loop (updated in place, no copy of the caches).
    lowered = jax.jit(step, donate_argnums=(1,)).lower(params, state, spec((batch, 1), jnp.int32),
                                                      spec((batch,), jnp.int32))
    return lowered.compile().as_text()


def _tables(hlo: str):
    """The HLO text's stack-frame tables -> {frame id: [(file, function, line), ...] innermost first}."""
    def section(name, until):
        return hlo.split("\n" + name + "\n", 1)[1].split("\n" + until + "\n", 1)[0]
    files = dict(re.findall(r'^(\d+) "([^"]+)"$', section("FileNames", "FunctionNames"), re.M))
    funcs = dict(re.findall(r'^(\d+) "([^"]+)"$', section("FunctionNames", "FileLocations"), re.M))
    locs = {m[0]: (files[m[1]].rsplit("/", 1)[-1], funcs[m[2]], int(m[3])) for m in re.findall(
        r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", section("FileLocations", "StackFrames"),
        re.M)}
    frames = dict((m[0], (m[1], m[2])) for m in re.findall(
        r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)", hlo.split("\nStackFrames\n", 1)[1], re.M))

    def chain(fid):
        out, seen = [], set()
        while fid in frames and fid not in seen:
            seen.add(fid)
            loc, fid = frames[fid]
            out.append(locs[loc])
        return out
    return chain


def launches(hlo: str, *, branch: str = "max"):
    """[(kernel name, kind, source line)] for every launch of the ENTRY computation, in schedule order.

    A `conditional` counts as one launch (its predicate) plus the launches of one branch: the largest one with
    branch="max" (a step on which every conditional runs its work), the smallest with branch="min"."""
    chain = _tables(hlo)
    bodies = {m[0]: m[1] for m in re.findall(r"^%?([\w.\-]+) \([^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S)}
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[entry.index("{\n") + 2:entry.index("\n}\n")]

    def walk(text):
        out = []
        for line in text.splitlines():
            m = re.search(r"%(\S+) = .*? ([a-z][\w-]*)\(", line)
            if not m or m.group(2) in _NOT_LAUNCHES:
                continue
            name, op = m.groups()
            kind = op
            ids = re.findall(r"stack_frame_id=(\d+)", line)
            if op == "conditional":
                names = re.findall(r"%?([\w.\-]+)", (re.search(r"branch_computations=\{([^}]*)\}", line) or
                                                      re.search(r"(true_computation=\S+, false_computation=\S+)",
                                                                line)).group(1).replace("true_computation=", "")
                                   .replace("false_computation=", ""))
                arms = [walk(bodies.get(n, "")) for n in names]
                out.append((name, "conditional", "?"))
                out.extend((max if branch == "max" else min)(arms, key=len))
                continue
            if op == "fusion":
                kind = "fusion:" + re.search(r"kind=(\w+)", line).group(1)
                callee = re.search(r"calls=%?([\w.\-]+)", line)
                ids += re.findall(r"stack_frame_id=(\d+)", bodies.get(callee.group(1), "") if callee else "")
            elif op == "custom-call":
                kind = "custom-call:" + re.search(r'custom_call_target="([^"]+)"', line).group(1)
            votes = collections.Counter()
            for fid in ids:
                src = next((f"{f}:{ln} {fn}" for f, fn, ln in chain(fid) if f in _OURS), None)
                if src:
                    votes[src] += 1
            out.append((name, kind, votes.most_common(1)[0][0] if votes else "?"))
        return out
    return walk(entry)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--hlo", default=None, help="write the optimized HLO here")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0"  # no device to time on
    t0 = time.time()
    hlo = compile_step(args.batch, args.layers, args.context)
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(hlo)
    ls = launches(hlo)
    low = launches(hlo, branch="min")
    print(f"H200 (deviceless), batch {args.batch}, {args.layers} layers, context {args.context}: "
          f"{len(ls)} launches per decode step when every conditional runs its work, {len(low)} when none does "
          f"(compiled in {time.time() - t0:.0f} s)")
    by_file = collections.Counter(src.split(":")[0] for _, _, src in ls)
    print("\n| source file | launches |\n|---|---|")
    for f, n in by_file.most_common():
        print(f"| {f} | {n} |")
    print("\n| source line | launches | kinds |\n|---|---|---|")
    by_line = collections.defaultdict(collections.Counter)
    for _, kind, src in ls:
        by_line[src][kind] += 1
    for src, kinds in sorted(by_line.items(), key=lambda kv: -sum(kv[1].values()))[:args.top]:
        print(f"| {src} | {sum(kinds.values())} | {', '.join(f'{k} {v}' for k, v in kinds.most_common())} |")


if __name__ == "__main__":
    main()
