#!/usr/bin/env bash
# Everything the GPU machine is needed for, in one call, most important first; each step is bounded so a slow
# one cannot eat the rest, and each step's log lands in $OUT (or ./out) for RESULTS.md.
#
#   benchmarks/gpu_session.sh [STEP ...]   steps: sinkhorn shard tests fused experts prefetch ncu_l2 decode decode_b1 decode_ab decode_cb profile ncu kernels sweep breakdown paired onerow smem
#
# One device call may run 600 s and each step is bounded, so e.g. `decode shard` (~500 s) or `tests` + `experts`
# (~450 s) fit one call each, and `kernels` (~280 s with every baseline) nearly fills one on its own.
# decode_cb is kept for the record: XLA command buffers made the step slower.
#
# tokamax (a moe_kernels.py baseline) is not on the GPU machine: build .carry/tokamax with
# benchmarks/carry_tokamax.sh and carry it to the `kernels` call.
#
# The GPU machine's transformers predates DeepSeek-V4, so the sharding test's tiny checkpoint is built here first
# (`python -m tests.gpu.test_sharding_gpu .carry/tiny_ckpt`) and carried; MEGAMOE_TINY_CKPT points at it.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MEGAMOE_TEST_GPU=1
[ -d .carry/tiny_ckpt ] && export MEGAMOE_TINY_CKPT=.carry/tiny_ckpt

step() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | tail -n "${TAIL:-12}"
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(decode shard profile tests kernels)
for s in "${steps[@]}"; do
  case "$s" in
    sinkhorn)  # the mHC Sinkhorn kernel's GPU test (the kernel is the default for prefill on Hopper)
             step sinkhorn 150 python -m pytest -q -p no:cacheprovider tests/gpu/test_sinkhorn_gpu.py --tb=short ;;
    shard)   # each compile of the tiny model took 35-50 s on an H200 (2026-12-01, autotuning on or off); the model
             # tests compile 6 programs, so this step needs its 300 s
             step shard 300 python -m pytest -q -p no:cacheprovider tests/gpu/test_sharding_gpu.py --tb=short \
                  --durations=0 ;;
    tests)   step tests 300 python -m pytest -q -p no:cacheprovider tests/gpu --tb=short \
                            --ignore=tests/gpu/test_sharding_gpu.py ;;
    decode)  # each batch size compiles its own loop (~40 s on an H200); bf16 only at batch 1 (its step is ~44 ms)
             step decode 260 python benchmarks/model_decode.py --formats nvfp4 --batches 1,8,64 --steps 32 --marginal-steps "${MARGINAL:-256}" \
                  --repeats 2 --json "$out/model_decode_nvfp4.json"
             [ "${BF16:-1}" = 1 ] && step decode_bf16 80 python benchmarks/model_decode.py --formats bf16 --batches 1 --steps 8 \
                  --repeats 1 --json "$out/model_decode_bf16.json" ;;
    fused)   step fused 200 python -m pytest -q -p no:cacheprovider tests/gpu/test_kernels_fused.py --tb=short ;;
    experts) # one layer's routed experts at decode sizes (CUPTI): the default against two compute warpgroups
             # everywhere and four everywhere (ncu_experts.py lists the other variants)
             step experts 150 python benchmarks/ncu_experts.py --time --tokens-list "${TOKENS:-1,2,8,64}" \
                  --variants "${VARIANTS:-default,wg2,wg4}" ;;
    prefetch)  # same-process A/B of the rows mode's L2 prefetch of the down weights (fused_moe.PREFETCH_DOWN), also
             # as a chain of calls on disjoint experts (a decode step's layers: weights cold in L2)
             step prefetch 200 python benchmarks/ncu_experts.py --time --tokens-list "${TOKENS:-1,2}" \
                  --variants "${VARIANTS:-default,pf_loads}" --chain "${CHAIN:-8}" ;;
    decode_b1)  # batch 1 only, same-process A/B of the routed rows (unsorted one-row items vs sorted), marginal step
             step decode_b1 200 python benchmarks/model_decode.py --formats nvfp4 --batches 1 --steps 32 \
                  --marginal-steps "${MARGINAL:-128}" --repeats "${REPEATS:-2}" --variants "${VARIANTS:-default,sorted_moe}" \
                  --json "$out/model_decode_b1.json" ;;
    decode_ab)  # same-process A/B of the decode step: the mHC Sinkhorn forms
             step decode_ab 300 python benchmarks/model_decode.py --formats nvfp4 --batches 1,8 --steps 32 \
                  --repeats 3 --variants sinkhorn_xla,sinkhorn_kernel \
                  --json "$out/model_decode_ab.json" ;;
    decode_cb)  # the same loop with the whole while loop captured as CUDA graphs (launch overhead per step)
             step decode_cb 120 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" \
                  python benchmarks/model_decode.py --formats nvfp4 --batches 1,8 --steps 32 --repeats 2 \
                  --json "$out/model_decode_cb.json" ;;
    profile) step profile 150 python benchmarks/decode_profile.py --batch 1 --json "$out/decode_profile.json" \
                  --hlo "$out/decode_step.hlo" ;;
    ncu)     # Nsight Compute on one layer's routed experts at T = 1 and 64: throughput, occupancy, stall reasons.
             # (Not `--page source --print-source sass`: ncu 2026-12-02 segfaulted on it and the call hung; the
             # device machine has no nsys.)
             ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
             for t in ${NCU_TOKENS:-1 64}; do
               step "ncu_t$t" 150 "$ncu" --clock-control none -k regex:mosaic --launch-skip 2 --launch-count 2 \
                    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
                    --section SchedulerStats --section WarpStateStats --section SourceCounters --print-details all \
                    python benchmarks/ncu_experts.py --tokens "$t"
             done ;;
    ncu_l2)  # DRAM bytes and L2 hit rate of the two expert kernels with L2 left as the previous kernel left it
             # (--cache-control none), e.g. whether a prefetch landed. Application replay: kernel replay saved and
             # restored all device memory (3.6 GB of weights) for each pass and ran past 90 s (2026-12-04).
             ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
             for v in ${VARIANTS:-default pf_loads}; do
               step "ncu_l2_$v" 150 "$ncu" --cache-control none --clock-control none --replay-mode application \
                    -k regex:mosaic --launch-skip 2 --launch-count 2 \
                    --metrics dram__bytes_read.sum,gpu__time_duration.sum,lts__t_sector_hit_rate.pct \
                    python benchmarks/ncu_experts.py --tokens 1 --variants "$v"
             done ;;
    kernels) # ~280 s on an H200 with every baseline (2026-12-02; XLA's ragged_dot takes 135 ms a call at T = 2048)
             step kernels 560 python benchmarks/moe_kernels.py --sections ceilings,permute,grouped,fused,actquant \
                              --tokens 1,8,64,256,2048,8192 --out "$out" ;;
    sweep)   # frozen configs against default_config (moe_kernels.SWEEP: decode K splits at T = 1, 8; row tiles)
             step sweep 300 python benchmarks/moe_kernels.py --sections sweep --tokens "${TOKENS:-1,8,64}" --out "$out" ;;
    paired)  # Config.paired_n (untimed until now): its GPU tests, then the grouped call at T = 1, 2 against the
             # default, sorted and as one-row items with the in-kernel gather; then the fused down kernel paired
             step paired_tests 200 python -m pytest -q -p no:cacheprovider tests/gpu/test_kernels_grouped.py -k paired \
                  --tb=short
             step paired_grouped 200 python benchmarks/ncu_experts.py --grouped --tokens-list "${TOKENS:-1,2}" \
                  --variants "default,rowsg:split_k=2,cfg:paired_n=true;split_k=4;num_stages=4,rowsg:paired_n=true;split_k=4;num_stages=4,rowsg:paired_n=true;split_k=2;num_stages=4"
             step paired_down 200 python benchmarks/ncu_experts.py --time --tokens-list "${TOKENS:-1,2}" \
                  --variants "default,down:paired_n=true;split_k=4,down:paired_n=true;split_k=2" --copy-tb-s 3.37 ;;
    onerow)  # the grouped call's one-row items from group sizes (<= 16 rows): its GPU tests, then the automatic
             # choice (the rows' groups searched in-kernel, or computed by XLA: auto:xla) against the sorted items
             # (default_config) at T = 1, 2 (CUPTI, per launch)
             step onerow_tests 150 python -m pytest -q -p no:cacheprovider tests/gpu/test_kernels_grouped.py -k one_row \
                  --tb=short
             step onerow_grouped 120 python benchmarks/ncu_experts.py --grouped --tokens-list "${TOKENS:-1,2,1}" \
                  --variants "${VARIANTS:-auto,auto:xla,default}" ;;
    smem)    # ONE_ROW_TABLE = "smem" (the rows' groups built in shared memory, no launch before the kernel): its GPU
             # tests, the grouped call at T = 1, 2 against the other tables and the sorted
             # items; then, if the tests passed, the issue's benchmark (tokamax carried if .carry/tokamax exists; with
             # every baseline its 300 s ended inside the fused block at T = 2048, H200 2026-12-07: give it a call of
             # its own, `kernels`, for the prefill rows)
             step smem_tests 150 python -m pytest -q -p no:cacheprovider tests/gpu/test_kernels_grouped.py \
                  -k "one_row and smem" --tb=short -x && smem_ok=1 || smem_ok=0
             step smem_grouped 140 python benchmarks/ncu_experts.py --grouped --tokens-list "${TOKENS:-1,2,1}" \
                  --variants "${VARIANTS:-auto:smem,auto:xla,auto:search,default}"
             [ "$smem_ok" = 1 ] && step kernels 300 python benchmarks/moe_kernels.py \
                  --sections ceilings,grouped,fused,actquant --tokens 1,8,64,256,2048,8192 --out "$out" ;;
    breakdown) # the grouped call's XLA glue against its kernel, per launch (decode sizes)
             step breakdown 90 python benchmarks/moe_kernels.py --sections breakdown --tokens 1,8,64 --out "$out" ;;
    *) echo "unknown step $s (sinkhorn shard tests fused experts prefetch ncu_l2 decode decode_b1 decode_ab decode_cb profile ncu kernels sweep breakdown paired onerow smem)" >&2; exit 2 ;;
  esac
done
