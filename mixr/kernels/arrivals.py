"""Arrival counters: one persistent zeroed int32 buffer per device for kernels that finish with a last-arrival step,
and the jit helper `arrive_last` that counts a program in.

Programs that each produce part of a result store it, count themselves in on a counter (atomic add, acq_rel), and
the one that arrives last reads every part back and finishes (the router's top-k selection, the fused MoE's sum
over experts). That last program zeroes its counter again, so the buffer stays zero between launches and no
zero-fill kernel runs per call. Kernels using it run in stream order: two of them must not run concurrently on
two streams of one device.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: no kernels use the counters
    triton = None

SIZE = 1 << 14  # counters per device; callers needing more take their path without counters
_BUFFERS: dict[torch.device, torch.Tensor] = {}


def arrival_counters(device: torch.device, n: int) -> torch.Tensor | None:
    """At least n zeroed counters on `device`, or None when n exceeds SIZE or the buffer would have to be created
    inside a CUDA-graph capture (a captured zero-fill would run on every replay). The engine's warm-up runs eagerly
    before its captures, so the buffer exists by then."""
    if n > SIZE:
        return None
    buf = _BUFFERS.get(device)
    if buf is None and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        buf = _BUFFERS[device] = torch.zeros(SIZE, dtype=torch.int32, device=device)
    return buf


if triton is not None:

    @triton.jit
    def arrive_last(cnt_ptr, n):
        # Count this program in on the counter at cnt_ptr; True in the n-th (last) program to arrive, which has zeroed
        # the counter again for the next launch (stream order separates launches). Every thread's earlier stores are
        # issued before the single (release) arrival, and the last arrival's acquire makes the other programs' stores
        # visible to it (grid.sync's pattern); it should still read them with cache_modifier=".cg" (from L2, never a
        # stale L1 line).
        tl.debug_barrier()
        last = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == n - 1
        if last:
            tl.store(cnt_ptr, 0)
        return last
