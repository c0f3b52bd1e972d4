"""bench.timeline: GPU-idle gaps in a profiler trace and what the host was doing in them."""

from __future__ import annotations

import torch

from pdserve.bench.timeline import (
    OUTSIDE,
    Span,
    Trace,
    busy_intervals,
    idle_gaps,
    summarize,
    trace_from_kineto,
)

US = 1_000  # ns


def make_trace() -> Trace:
    # GPU: k1 [0, 100) and k2 [50, 120) on two streams (one busy stretch), k3 [400, 500),
    # k4 [503, 600); the window is [0, 1000).
    # Host: step [90, 900) > schedule [100, 250) > gc [200, 300); execute [300, 700).
    # k3 was launched at 390 (after the GPU went idle at 120); k4 at 10 (long before).
    ops = [
        Span(0, 100 * US, "k1", 1),
        Span(50 * US, 120 * US, "k2", 2),
        Span(400 * US, 500 * US, "k3", 3),
        Span(503 * US, 600 * US, "k4", 4),
    ]
    annotations = sorted(
        [
            Span(90 * US, 900 * US, "step"),
            Span(100 * US, 250 * US, "schedule"),
            Span(200 * US, 300 * US, "gc"),
            Span(300 * US, 700 * US, "execute 64 tok"),  # the summary groups by first word
        ],
        key=lambda s: (s.start_ns, -s.end_ns),
    )
    calls = {
        3: Span(390 * US, 395 * US, "cudaLaunchKernel", 3),
        4: Span(10 * US, 12 * US, "cudaGraphLaunch", 4),
    }
    slow = [Span(320 * US, 380 * US, "cudaHostAlloc"), Span(950 * US, 960 * US, "cudaFree")]
    return Trace(Span(0, 1000 * US, "window"), ops, annotations, calls, slow)


def test_busy_intervals_merge_overlapping_streams() -> None:
    merged = busy_intervals(make_trace().device_ops)
    assert [(start // US, end // US) for start, end, _, _ in merged] == [(0, 120), (400, 500), (503, 600)]
    assert merged[0][2].name == "k1" and merged[0][3].name == "k2"


def test_gaps_are_split_over_the_innermost_host_annotation() -> None:
    trace = make_trace()
    gaps = idle_gaps(trace, min_gap_us=2.0)
    assert [(g.start_ns // US, g.end_ns // US) for g in gaps] == [(120, 400), (500, 503), (600, 1000)]
    first, small, tail = gaps
    # 120-200 schedule, 200-300 gc (inside schedule until 250, still gc after), 300-400 execute
    assert first.by_annotation == {"schedule": 80 * US, "gc": 100 * US, "execute 64 tok": 100 * US}
    assert first.ended_by == "cudaLaunchKernel" and first.host_late
    assert (first.kernel_before, first.kernel_after) == ("k2", "k3")
    assert small.ended_by == "cudaGraphLaunch" and not small.host_late
    # 600-700 execute, 700-900 step only, 900-1000 outside every annotation
    assert tail.by_annotation == {"execute 64 tok": 100 * US, "step": 200 * US, OUTSIDE: 100 * US}
    assert tail.ended_by == "" and tail.kernel_after == ""
    assert [len(idle_gaps(trace, min_gap_us=m)) for m in (2.0, 5.0, 500.0)] == [3, 2, 0]


def test_summary_totals() -> None:
    trace = make_trace()
    summary = summarize(trace, idle_gaps(trace), top=2)
    assert summary["window_ms"] == 1.0
    assert summary["gpu_busy_ms"] == 0.317
    assert abs(summary["gpu_idle_ms"] - 0.683) < 1e-9
    assert summary["idle_in_gaps_ms"] == summary["gpu_idle_ms"]
    assert summary["host_late_ms"] == 0.28
    assert summary["idle_by_host_annotation_ms"] == {
        "step": 0.2,
        "execute": 0.203,  # 100 + 3 + 100 us
        "gc": 0.1,
        OUTSIDE: 0.1,
        "schedule": 0.08,
    }
    assert summary["idle_by_gap_end_ms"]["cudaLaunchKernel after idle"] == 0.28
    assert summary["slow_host_calls"] == {
        "cudaHostAlloc in execute": {"count": 1, "ms": 0.06},
        f"cudaFree in {OUTSIDE}": {"count": 1, "ms": 0.01},
    }
    largest, second = summary["largest_gaps"]
    assert (largest["ms"], second["ms"]) == (0.4, 0.28)
    assert [name for name, _, _ in second["host_sequence"]] == ["step", "schedule", "gc", "execute 64 tok"]
    assert second["host_sequence"][0][1:] == (-0.03, 0.81)  # ms from the gap's start, ms long
    assert summary["gaps_by_size"] == {"<1ms": {"count": 2, "ms": 0.68}, "<10us": {"count": 1, "ms": 0.003}}


def test_trace_from_a_real_profile_on_cpu() -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("window"):
            with torch.profiler.record_function("phase"):
                torch.ones(8) + 1
    trace = trace_from_kineto(prof, "window")
    assert [s.name for s in trace.annotations] == ["phase"]
    phase = trace.annotations[0]
    assert trace.window.start_ns <= phase.start_ns < phase.end_ns <= trace.window.end_ns
    assert trace.device_ops == []  # no GPU: the whole window is one gap, all of it under "phase" or none
    (gap,) = idle_gaps(trace)
    assert sum(gap.by_annotation.values()) == gap.duration_ns == trace.window.end_ns - trace.window.start_ns
