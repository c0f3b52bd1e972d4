"""When the GPU sits idle, and what the host was doing meanwhile: a timeline read of a
torch.profiler trace (kineto events, CPU and GPU on one clock).

    gaps = idle_gaps(trace_from_kineto(prof), min_gap_us=2.0)
    summary = summarize(gaps, top=10)

A gap is an interval inside the profiled window with no kernel, memcpy or memset running
on any GPU stream. Each gap's time is split over the host annotations
(`torch.profiler.record_function` ranges: engine phases, `gc`) that cover it, the
innermost one winning, so "schedule: 120 ms" means the GPU waited 120 ms while the host
was inside Scheduler.schedule(). Each gap also names the host call that ended it (the
launch correlated with the first kernel after the gap) and whether that call began after
the GPU went idle: then the host was late; otherwise the GPU waited on something else
(a copy, an event).
"""

from __future__ import annotations

import bisect
import functools
import itertools
from collections import defaultdict
from dataclasses import dataclass, field

OUTSIDE = "(none)"  # no host annotation open
SLOW_CALL_NS = 100_000


@dataclass(frozen=True)
class Span:
    start_ns: int
    end_ns: int
    name: str
    correlation_id: int = 0


@dataclass
class Trace:
    """The profiled window's events, split by kind; every list sorted by start."""

    window: Span  # the annotation that encloses the measured work
    device_ops: list[Span]  # kernels, memcpys, memsets on the GPU
    annotations: list[Span]  # record_function ranges on the host
    runtime_calls: dict[int, Span] = field(default_factory=dict)  # correlation id -> launch/copy call
    slow_calls: list[Span] = field(default_factory=list)  # host ops and CUDA calls >= 100 us

    @functools.cached_property
    def annotation_index(self) -> tuple[list[int], int]:
        """Annotation start times, and the longest annotation (bounds a search back)."""
        longest = max((s.end_ns - s.start_ns for s in self.annotations), default=0)
        return [s.start_ns for s in self.annotations], longest


@dataclass(frozen=True)
class Gap:
    start_ns: int
    end_ns: int
    by_annotation: dict[str, int]  # ns of this gap spent under each (innermost) annotation
    ended_by: str  # the host call whose work ended the gap ("" at the window's end)
    host_late: bool  # that call began after the GPU went idle
    kernel_before: str
    kernel_after: str
    host_sequence: tuple[Span, ...] = ()  # the annotations overlapping the gap, by start

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


def trace_from_kineto(prof, window_name: str) -> Trace:
    """Split a finished torch.profiler.profile's kineto events; `window_name` is the
    record_function range around the measured work (its first occurrence)."""
    import torch

    device_ops: list[Span] = []
    annotations: list[Span] = []
    runtime: dict[int, Span] = {}
    slow: list[Span] = []
    window = None
    for event in prof.profiler.kineto_results.events():
        # (activity_type() would say which is which, but not every torch has it)
        on_host = event.device_type() == torch.autograd.DeviceType.CPU
        start, duration = event.start_ns(), event.duration_ns()
        span = Span(start, start + duration, event.name(), event.correlation_id())
        if event.is_user_annotation():
            if not on_host:
                continue  # the GPU-side copy of a host range: not work
            if event.name() != window_name:
                annotations.append(span)
            elif window is None:
                window = span
        elif not on_host:
            device_ops.append(span)  # kernel, memcpy, memset
        else:
            if span.correlation_id and event.name().startswith("cu"):
                runtime[span.correlation_id] = span  # cudaLaunchKernel, cuLaunchKernel (Triton), ...
            if duration >= SLOW_CALL_NS:  # a launch into a full queue, a sync, an allocation
                slow.append(span)
    if window is None:
        raise ValueError(f"no {window_name!r} range in the trace")
    device_ops.sort(key=lambda s: s.start_ns)
    annotations.sort(key=lambda s: (s.start_ns, -s.end_ns))
    return Trace(window, device_ops, annotations, runtime, slow)


def busy_intervals(ops: list[Span]) -> list[tuple[int, int, Span, Span]]:
    """Merged [start, end) intervals when some GPU op runs, with the op that opens and the
    op that closes each (ops sorted by start; overlapping streams merge)."""
    merged: list[tuple[int, int, Span, Span]] = []
    for op in ops:
        if merged and op.start_ns <= merged[-1][1]:
            start, end, first, last = merged[-1]
            if op.end_ns > end:
                merged[-1] = (start, op.end_ns, first, op)
        else:
            merged.append((op.start_ns, op.end_ns, op, op))
    return merged


def _innermost_split(start: int, end: int, covering: list[Span]) -> dict[str, int]:
    """ns of [start, end) under each annotation, the innermost (latest-starting) covering
    one winning; the rest goes to OUTSIDE."""
    clip = lambda t: min(max(t, start), end)  # noqa: E731
    cuts = sorted({start, end} | {clip(s.start_ns) for s in covering} | {clip(s.end_ns) for s in covering})
    split: dict[str, int] = defaultdict(int)
    for lo, hi in itertools.pairwise(cuts):
        inside = [s for s in covering if s.start_ns <= lo and s.end_ns >= hi]
        name = max(inside, key=lambda s: s.start_ns).name if inside else OUTSIDE
        split[name] += hi - lo
    return dict(split)


def _covering(trace: Trace, start: int, end: int) -> list[Span]:
    """The annotations overlapping [start, end), by start."""
    starts, longest = trace.annotation_index
    first = bisect.bisect_left(starts, start - longest)
    last = bisect.bisect_left(starts, end)
    return [s for s in trace.annotations[first:last] if s.end_ns > start]


def slow_calls_by_site(trace: Trace) -> dict[str, dict]:
    """Host ops (aten::mm, ...) and CUDA API calls that held the host >= 100 us, by (name,
    innermost annotation); nested ops each count (aten::linear and the aten::mm in it)."""
    sites: dict[str, dict] = {}
    lo, hi = trace.window.start_ns, trace.window.end_ns
    for call in trace.slow_calls:
        if call.end_ns <= lo or call.start_ns >= hi:
            continue
        inside = [s for s in _covering(trace, call.start_ns, call.end_ns) if s.start_ns <= call.start_ns]
        where = phase_of(max(inside, key=lambda s: s.start_ns).name) if inside else OUTSIDE
        site = sites.setdefault(f"{call.name} in {where}", {"count": 0, "ms": 0.0})
        site["count"] += 1
        site["ms"] += span_ms(call)
    return dict(sorted(sites.items(), key=lambda kv: -kv[1]["ms"]))


def idle_gaps(trace: Trace, min_gap_us: float = 2.0) -> list[Gap]:
    """Every GPU-idle interval of at least `min_gap_us` inside the window."""
    lo, hi = trace.window.start_ns, trace.window.end_ns
    busy = busy_intervals([op for op in trace.device_ops if op.end_ns > lo and op.start_ns < hi])
    # idle stretches: window start -> first op, between merged intervals, last op -> window end
    edges: list[tuple[int, int, Span | None, Span | None]] = []
    previous_end, previous_op = lo, None
    for start, end, first, last in busy:
        edges.append((previous_end, start, previous_op, first))
        previous_end, previous_op = max(previous_end, end), last
    edges.append((previous_end, hi, previous_op, None))
    gaps = []
    for start, end, before, after in edges:
        start, end = max(start, lo), min(end, hi)
        if end - start < min_gap_us * 1e3:
            continue
        covering = _covering(trace, start, end)
        call = trace.runtime_calls.get(after.correlation_id) if after is not None else None
        gaps.append(
            Gap(
                start_ns=start,
                end_ns=end,
                by_annotation=_innermost_split(start, end, covering),
                ended_by=call.name if call else "",
                host_late=call is not None and call.start_ns >= start,
                kernel_before=before.name if before else "",
                kernel_after=after.name if after else "",
                host_sequence=tuple(covering),
            )
        )
    return gaps


def span_ms(span: Span) -> float:
    return (span.end_ns - span.start_ns) / 1e6


def phase_of(annotation: str) -> str:
    """An annotation's first word: "execute 8192 tok" and "execute 512 tok" add up."""
    return annotation.split(" ", 1)[0]


def summarize(trace: Trace, gaps: list[Gap], top: int = 10) -> dict:
    """Totals (ms) by annotation, by what ended each gap, by gap size; the largest gaps."""
    window_ns = trace.window.end_ns - trace.window.start_ns
    busy_ns = sum(
        min(end, trace.window.end_ns) - max(start, trace.window.start_ns)
        for start, end, _, _ in busy_intervals(trace.device_ops)
        if end > trace.window.start_ns and start < trace.window.end_ns
    )
    by_annotation: dict[str, float] = defaultdict(float)
    by_end: dict[str, float] = defaultdict(float)
    by_size: dict[str, list[float]] = {}
    late_ns = 0
    for gap in gaps:
        for name, ns in gap.by_annotation.items():
            by_annotation[phase_of(name)] += ns / 1e6
        by_end[(gap.ended_by or "(window end)") + (" after idle" if gap.host_late else "")] += (
            gap.duration_ns / 1e6
        )
        late_ns += gap.duration_ns if gap.host_late else 0
        us = gap.duration_ns / 1e3
        size = "<10us" if us < 10 else "<100us" if us < 100 else "<1ms" if us < 1e3 else ">=1ms"
        count_ms = by_size.setdefault(size, [0, 0.0])
        count_ms[0] += 1
        count_ms[1] += gap.duration_ns / 1e6
    ms = lambda d: {k: round(v, 3) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}  # noqa: E731
    return {
        "window_ms": window_ns / 1e6,
        "gpu_busy_ms": busy_ns / 1e6,
        "gpu_idle_ms": (window_ns - busy_ns) / 1e6,
        "idle_in_gaps_ms": sum(g.duration_ns for g in gaps) / 1e6,
        "num_gaps": len(gaps),
        "host_late_ms": late_ns / 1e6,
        "idle_by_host_annotation_ms": ms(by_annotation),
        "idle_by_gap_end_ms": ms(by_end),
        "slow_host_calls": {
            k: {"count": v["count"], "ms": round(v["ms"], 3)} for k, v in slow_calls_by_site(trace).items()
        },
        "gaps_by_size": {k: {"count": c, "ms": round(t, 3)} for k, (c, t) in by_size.items()},
        "largest_gaps": [
            {
                "at_ms": round((g.start_ns - trace.window.start_ns) / 1e6, 3),
                "ms": round(g.duration_ns / 1e6, 3),
                "host": {k: round(v / 1e6, 3) for k, v in g.by_annotation.items()},
                # (annotation, ms from the gap's start, ms long): what the host went through
                "host_sequence": [
                    (
                        s.name,
                        round((s.start_ns - g.start_ns) / 1e6, 3),
                        round((s.end_ns - s.start_ns) / 1e6, 3),
                    )
                    for s in g.host_sequence[:24]
                ],
                "ended_by": g.ended_by,
                "host_late": g.host_late,
                "before": g.kernel_before[:60],
                "after": g.kernel_after[:60],
            }
            for g in sorted(gaps, key=lambda g: -g.duration_ns)[:top]
        ],
    }
