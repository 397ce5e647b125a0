#!/usr/bin/env bash
# Builds .carry/tokamax: tokamax (a baseline of benchmarks/moe_kernels.py) with its pure-Python dependencies, for
# the GPU machine, which has no network. Carry it to the device call (`carry: [".carry/tokamax"]`, ~41 MB);
# moe_kernels.py appends it to sys.path (after the machine's own packages, which take precedence).
# tokamax imports xprof for profiling only; xprof is large and unused here, so a stub stands in for it.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON312:-}
for c in .venv/bin/python python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do   # the first working 3.12
  [ -n "$py" ] && break
  "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && py=$c
done
[ -n "$py" ] || { echo "needs Python 3.12 (PYTHON312=...)" >&2; exit 1; }
dst=.carry/tokamax
rm -rf "$dst" && mkdir -p "$dst"
"$py" -m pip install -q --no-deps --target "$dst" "tokamax==${TOKAMAX_VERSION:-0.0.17}" absl-py einshape jaxtyping \
    wadler-lindig pydantic pydantic-core annotated-types typing-inspection qwix tqdm immutabledict tensorboardx
mkdir -p "$dst/xprof/cli/tools"
echo '"""Stub: tokamax imports xprof for profiling, which moe_kernels.py does not use."""' > "$dst/xprof/__init__.py"
touch "$dst/xprof/cli/__init__.py"
printf 'def get_kernel_stats_tool(*a, **k):\n    raise NotImplementedError("xprof stub (benchmarks/carry_tokamax.sh)")\n' \
    > "$dst/xprof/cli/tools/__init__.py"
du -sh "$dst"
