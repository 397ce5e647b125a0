"""Wall time of one jitted call on the GPU, from a profiler trace: first kernel start to last kernel end.

CUPTI's per-kernel durations (`jax.experimental.mosaic.gpu.profiler.measure`, what the other tables report) sum the
kernels' own times: they leave out the gaps between launches, and they cannot show two kernels overlapping (a
kernel launched early with programmatic dependent launch, PDL, starting while the one before it drains). Mosaic
GPU's CUPTI records run one call's kernels one after another; with calls queued back to back the early kernel's
record included its wait, counting the overlap twice (H200, benchmarks/RESULTS.md, seventeenth session).
The span of a call counts every gap and every overlap once: it is the time the call holds the GPU.

`span(f, *args)` traces `iterations` calls (each waited for, with a pause in between, so that calls separate),
reads the trace's GPU plane (`jax.profiler.ProfileData`) and returns the median span, the median sum of the
activities' durations, and one call's activities (name, start offset, duration; memsets and copies included).
"""
from __future__ import annotations

import glob
import statistics
import tempfile
import time

import jax


def _gpu_events(path: str):
    """(name, start_ns, duration_ns) of every activity on the GPU planes' stream lines."""
    from jax.profiler import ProfileData
    data = ProfileData.from_file(path)
    events = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            # Stream lines hold the activities; "XLA Modules" / "XLA Ops" / "Steps" lines are derived from them.
            if not line.name.startswith("Stream"):
                continue
            events += [(e.name, e.start_ns, e.duration_ns) for e in line.events]
    return sorted(events, key=lambda e: e[1])


def span(f, *args, iterations: int = 9, pause_s: float = 0.003):
    """Median span (ms), median summed duration (ms) and one call's [(name, start_us, dur_us)] of f(*args)."""
    jax.block_until_ready(f(*args))              # compile and warm up outside the trace
    out_dir = tempfile.mkdtemp(prefix="megamoe_trace_")
    with jax.profiler.trace(out_dir):
        for _ in range(iterations):
            jax.block_until_ready(f(*args))
            time.sleep(pause_s)
    paths = glob.glob(out_dir + "/**/*.xplane.pb", recursive=True)
    if not paths:
        raise RuntimeError(f"no trace written under {out_dir}")
    events = _gpu_events(paths[0])
    if not events:
        raise RuntimeError(f"the trace {paths[0]} has no GPU stream activities")
    return summarize(split_calls(events, iterations, gap_ns=pause_s * 1e9 / 2))


def split_calls(events, iterations: int, gap_ns: float):
    """Group (name, start_ns, duration_ns) activities, sorted by start, into calls: a new call starts where an
    activity begins more than gap_ns after every earlier one has ended (the host's pause between calls; gaps inside
    a call are far shorter). Every call must have the same number of activities."""
    if not events:
        raise RuntimeError("no activities to split")
    calls, cur, last_end = [], [events[0]], events[0][1] + events[0][2]
    for ev in events[1:]:
        if ev[1] - last_end > gap_ns:
            calls.append(cur)
            cur = []
        cur.append(ev)
        last_end = max(last_end, ev[1] + ev[2])
    calls.append(cur)
    if len(calls) != iterations or len({len(c) for c in calls}) != 1:
        raise RuntimeError(f"could not split the trace into {iterations} equal calls: activity counts "
                           f"{[len(c) for c in calls]}")
    return calls


def summarize(calls):
    """Median span (ms: first start to last end, overlaps once), median summed duration (ms, overlaps twice) and
    the median-position call's activities as (name, start_us from the call's start, duration_us)."""
    spans = [(max(s + d for _, s, d in c) - c[0][1]) / 1e6 for c in calls]
    sums = [sum(d for _, _, d in c) / 1e6 for c in calls]
    mid = calls[len(calls) // 2]
    one = [(name, (s - mid[0][1]) / 1e3, d / 1e3) for name, s, d in mid]
    return statistics.median(spans), statistics.median(sums), one

