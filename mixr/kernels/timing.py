"""Timing GPU work between CUDA events, eagerly or as a CUDA graph: what `install_skinny` measures at start-up and what
the kernel benches report."""

import statistics
import time

import torch


def graph_ms(calls, reps: int | None = None, min_ms: float = 25.0, batches: int = 7) -> float:
    """Median GPU milliseconds per call of `calls` (zero-argument callables), captured in one CUDA graph (so the
    launch overhead of eager Python does not hide a 3 us kernel) and replayed between CUDA events. reps: replays
    per timed batch; None: about min_ms worth, from one timed replay (3 to 500)."""
    for c in calls:  # compile and warm up outside the capture
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    ms = events_ms(g.replay, reps, min_ms, batches)
    del g
    return ms / len(calls)


def events_ms(fn, reps: int | None = None, min_ms: float = 25.0, batches: int = 7, min_reps: int = 3,
              max_reps: int = 500) -> float:
    """Median GPU milliseconds per call of fn (warmed up already), timed between CUDA events in batches of reps
    calls. reps None: about min_ms worth, from one timed call (min_reps to max_reps)."""
    if reps is None:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        reps = max(min_reps, min(max_reps, int(min_ms / 1e3 / max(time.perf_counter() - t0, 1e-6))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(batches):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)
