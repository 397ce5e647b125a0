"""CPU: benchmarks/gpu_trace.py's reading of a trace (the trace itself needs a GPU)."""
import pytest

from benchmarks import gpu_trace


def _call(t0, acts):
    """Activities (name, start_ns, duration_ns) of one call starting at t0 from (name, offset_us, duration_us)."""
    return [(n, t0 + int(o * 1e3), int(d * 1e3)) for n, o, d in acts]


def test_span_counts_gaps_and_overlap_once():
    # gate/up 0-23 us, down launched early at 15 us for 20 us (ends 35), combine 34.5-35.6 us
    one = [("gate_up", 0.0, 23.0), ("down", 15.0, 20.0), ("combine", 34.5, 1.1)]
    events = _call(0, one) + _call(5_000_000, one) + _call(10_000_000, one)
    calls = gpu_trace.split_calls(sorted(events, key=lambda e: e[1]), 3, gap_ns=1e6)
    assert [len(c) for c in calls] == [3, 3, 3]
    span, total, acts = gpu_trace.summarize(calls)
    assert span == pytest.approx(35.6e-3)         # ms: first start to last end
    assert total == pytest.approx(44.1e-3)        # the durations' sum counts the 8 us overlap twice
    assert [a[0] for a in acts] == ["gate_up", "down", "combine"]
    assert acts[1][1] == pytest.approx(15.0) and acts[1][2] == pytest.approx(20.0)


def test_a_short_kernel_inside_a_long_one_does_not_split_the_call():
    # the second activity ends before the first: the call's end is the longest-running one's, not the last start's
    one = [("long", 0.0, 50.0), ("short", 1.0, 1.0), ("tail", 49.0, 2.0)]
    calls = gpu_trace.split_calls(_call(0, one) + _call(2_000_000, one), 2, gap_ns=20e3)
    assert [len(c) for c in calls] == [3, 3]
    assert gpu_trace.summarize(calls)[0] == pytest.approx(51e-3)


def test_unequal_calls_are_an_error():
    events = _call(0, [("a", 0, 1), ("b", 2, 1)]) + _call(5_000_000, [("a", 0, 1)])
    with pytest.raises(RuntimeError, match="equal calls"):
        gpu_trace.split_calls(events, 2, gap_ns=1e6)
