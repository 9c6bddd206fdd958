"""CPU+GPU hybrid MoE inference: routed experts beyond a GPU memory budget live in pinned CPU memory.

`load_offloaded(model_dir, device, dtype, gpu_expert_budget_gb)` loads the model on the CPU, moves everything
but the routed experts (attention, dense layers, shared experts, routers, embeddings) to `device`, and puts an
`OffloadedExperts` in place of every MoE layer's `Experts` (same forward signature). Each one keeps:

  - a cache of resident experts on the device, `slots` of them per layer (the budget split evenly over the MoE
    layers), chosen by use frequency: decayed per-expert token counts, the least frequent evicted;
  - all its experts in pinned CPU memory.

Per call, with the routing on the host (one device-to-host sync per MoE layer):
  1. resident pairs run on the device with the fused kernels; the other pairs are given id -1, which they skip;
  2. some missing experts run on the CPU (plain PyTorch, torch's intra-op threads) while the device runs step 1:
     their weights stay where they are and only activations cross the bus;
  3. the other missing experts are copied in on a side stream, a few at a time into two staging buffers, so the
     copy of the next group overlaps the compute of this one; a copied expert used more often than the
     least-used resident one takes its slot (a device-to-device copy).
  Which misses go to the CPU: those with the fewest tokens, as many as finish the layer soonest by the costs
  measured at start-up (`_Staging.calibrate`: per expert on the CPU, a fixed part plus a part per token; per
  copy; and how much both slow each other down when they run at once, since both read host memory). Decode
  misses (one token each) may split between the two, prefill misses (many tokens each) are mostly copied. An
  expert with more than `cpu_max_tokens` tokens is never computed on the CPU; `balance=False` sends every other
  miss there.
  Between calls, a decode that keeps missing an expert promotes it: an asynchronous copy into the slot of a
  resident expert used less than half as often, which the next call of that layer waits for on the device.

Bulk path (prefill): a call with at least `bulk_min_tokens` tokens (default 128) replaces steps 2-3. So many
tokens use nearly every expert (near-uniform routing at 128 tokens: each of V2-Lite's 64 experts, top-6, unused
with probability 3e-6; V3's 256, top-8: 2%), so the call copies all of the layer's non-resident experts, one
copy per run of consecutive expert ids (a few large copies instead of two small ones per expert), into one of
two device buffers of that size shared by every layer (`_Bulk`), and runs them in one fused call. The token
count is the same in every layer of a forward and the copy does not depend on the routing, so layer l queues
layer l+1's copy into the other buffer before its own compute (the first MoE layer's copy starts when it runs):
the side stream copies back to back while the device computes, and a prefill costs about one bus transfer of
the non-resident experts (naive offload: all experts, and compute waiting for each layer's copy). Below the
threshold only the experts used cross the bus (or none, on the CPU), which is what decode needs. The buffers
take 2 x (experts - slots) experts of device memory beyond the budget; bulk_min_tokens=None turns the path off
and allocates nothing.

The host must see the routing each layer, so CUDA graphs cannot capture this forward: the engine decodes eagerly
when offload is on. With the whole budget (every expert resident) there is no host round trip at all.
On a CPU `device` the same code runs with the "device" cache in CPU memory (how the tests exercise it).
"""

import time
from dataclasses import dataclass, fields
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mixr.checkpoint import load_model
from mixr.kernels.fused_moe import fused_moe
from mixr.layers.moe import MoE
from mixr.models.base import CausalLM


@dataclass
class OffloadStats:
    """Counters of one layer (summed over layers by `offload_stats`). A pair is one (token, expert) choice."""

    calls: int = 0
    tokens: int = 0
    pairs: int = 0
    gpu_pairs: int = 0        # served by a resident expert
    cpu_pairs: int = 0        # computed on the CPU
    copied_pairs: int = 0     # served by an expert copied in for the call
    copied_experts: int = 0   # host-to-device expert copies for calls
    admitted: int = 0         # copied experts that took a cache slot
    promoted: int = 0         # asynchronous promotions after CPU misses
    bulk_calls: int = 0       # calls that took the bulk path (their copies count in copied_experts)
    prefetched: int = 0       # bulk calls whose copy the previous layer had started


class _Staging:
    """Device buffers for experts copied in for one call, shared by every layer: two halves, so the copy of one
    group (on the side stream) overlaps the compute on the other."""

    def __init__(self, group: int, two_i: int, hidden: int, inter: int, dtype: torch.dtype, device: torch.device):
        self.group = group
        self.gate_up = torch.empty(2, group, two_i, hidden, dtype=dtype, device=device)
        self.down = torch.empty(2, group, hidden, inter, dtype=dtype, device=device)
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.ready = [torch.cuda.Event() for _ in range(2)] if self.cuda else None
        self.free = [torch.cuda.Event() for _ in range(2)] if self.cuda else None
        self.next = 0
        # per-expert cost estimates in seconds, from `calibrate`
        self.cpu_fixed, self.cpu_per_token, self.copy_cost, self.contention = 0.0, 0.0, 1.0, 1.0

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    def calibrate(self, gate_up: torch.Tensor, down: torch.Tensor, reps: int = 5) -> dict:
        """Time one expert on the CPU at 1 and 16 tokens, one expert's host-to-device copy, and both at once (on
        CUDA): the CPU's reads and the copies share the host's memory bandwidth, and `contention` (>= 1) is how
        much longer the two take together than the slower of them alone."""
        E, H = gate_up.shape[0], gate_up.shape[2]
        turn = iter(range(1 << 30))  # a different expert each time, as in use: not one the CPU caches hold

        def best(fn) -> float:
            fn(next(turn) % E)
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn(next(turn) % E)
                if self.cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            return min(times)

        one, many = (torch.randn(n, H).to(gate_up.dtype) for n in (1, 16))
        w = torch.ones(16, 1)

        def cpu(e, x=one, n=1):
            _cpu_experts(x, gate_up, down, torch.full((n, 1), e), w[:n], [e])

        def copy(e, n=1):
            for j in range(n):
                self.gate_up[0, j].copy_(gate_up[(e + j) % E], non_blocking=True)
                self.down[0, j].copy_(down[(e + j) % E], non_blocking=True)

        t1 = best(cpu)
        t16 = best(lambda e: cpu(e, many, 16))
        self.cpu_per_token = max(0.0, (t16 - t1) / 15)
        self.cpu_fixed = max(0.0, t1 - self.cpu_per_token)
        self.copy_cost = best(copy)
        if self.cuda:
            n = self.group
            alone = max(best(lambda e: [cpu((e + j) % E) for j in range(n)]), best(lambda e: copy(e, n)))
            both = best(lambda e: (copy(e, n), [cpu((e + n + j) % E) for j in range(n)]))
            self.contention = max(1.0, both / alone)
        return {"cpu_expert_ms": 1e3 * t1, "cpu_expert_per_token_ms": 1e3 * self.cpu_per_token,
                "copy_expert_ms": 1e3 * self.copy_cost, "contention": self.contention}


def _cpu_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
                 weights: torch.Tensor, experts: list[int]) -> torch.Tensor:
    """The routed experts `experts` on the CPU: x (T, H), ids/weights (T, k) -> float32 (T, H). The same
    arithmetic as fused_moe_ref (activation rounded to x's dtype, float32 sums), in fewer ops per expert."""
    I = down.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32)
    for e in experts:
        rows, cols = (ids == e).nonzero(as_tuple=True)
        xe = x if rows.numel() == x.shape[0] else x[rows]  # one token: no gather
        h = F.linear(xe, gate_up[e]).float()  # (n, 2I)
        act = (F.silu(h[:, :I]) * h[:, I:]).to(x.dtype)
        y = F.linear(act, down[e]).float() * weights[rows, cols, None]
        if rows.numel() == x.shape[0]:
            out += y
        else:
            out.index_add_(0, rows, y)
    return out


class _Bulk:
    """The bulk path's two device buffers, each the size of one layer's non-resident experts, shared by every
    layer: layer l computes on one while layer l+1's experts are copied into the other (module docstring)."""

    def __init__(self, experts: int, two_i: int, hidden: int, inter: int, dtype: torch.dtype, device: torch.device,
                 stream, min_tokens: int):
        self.min_tokens = min_tokens
        self.gate_up = torch.empty(2, experts, two_i, hidden, dtype=dtype, device=device)
        self.down = torch.empty(2, experts, hidden, inter, dtype=dtype, device=device)
        self.cuda = device.type == "cuda"
        self.stream = stream  # the staging's side stream: every host-to-device copy of experts in one queue
        self.ready = [torch.cuda.Event() for _ in range(2)] if self.cuda else None
        self.free = [torch.cuda.Event() for _ in range(2)] if self.cuda else None
        # per buffer, what it holds or is being filled with: (layer, its cache version, expert -> position on
        # the device, the same on the host); None once taken
        self.held: list[tuple | None] = [None, None]
        self.next_of: dict = {}  # layer -> the MoE layer that runs after it, whose copy it starts

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    def fill(self, layer: "OffloadedExperts", b: int) -> None:
        """Queue the copy of every non-resident expert of `layer` into buffer b, positions in expert order."""
        missing = [e for e, slot in enumerate(layer.slot_of) if slot < 0]
        pos = {e: j for j, e in enumerate(missing)}
        # pinned, so that the upload does not wait for the copies in flight (see OffloadedExperts._run_copied)
        table = torch.full((layer.num_experts + 1,), -1, dtype=torch.long, pin_memory=self.cuda)
        table[missing] = torch.arange(len(missing))
        table = table.to(layer.device, non_blocking=True)
        runs, j = [], 0  # (first expert, count, first position): consecutive ids are one copy per tensor
        while j < len(missing):
            n = 1
            while j + n < len(missing) and missing[j + n] == missing[j] + n:
                n += 1
            runs.append((missing[j], n, j))
            j += n
        if self.cuda:
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(self.free[b])  # the compute that last read this buffer is done
                for e, n, j in runs:
                    self.gate_up[b, j:j + n].copy_(layer.cpu_gate_up[e:e + n], non_blocking=True)
                    self.down[b, j:j + n].copy_(layer.cpu_down[e:e + n], non_blocking=True)
                self.ready[b].record(self.stream)
        else:
            for e, n, j in runs:
                self.gate_up[b, j:j + n].copy_(layer.cpu_gate_up[e:e + n])
                self.down[b, j:j + n].copy_(layer.cpu_down[e:e + n])
        self.held[b] = (layer, layer.version, table, pos)

    def take(self, layer: "OffloadedExperts") -> tuple[int, torch.Tensor, dict, bool]:
        """(buffer, expert -> position table on the device and on the host, whether it was prefetched) for
        `layer`'s call: its prefetched copy when the cache has not changed since, else a copy started now."""
        prefetched = False
        for b, h in enumerate(self.held):
            if h is not None and h[0] is layer and h[1] == layer.version:
                prefetched = True
                break
        else:
            b = 0  # either buffer may be refilled: the next layer's prefetch goes into the other
            self.fill(layer, b)
        _, _, table, pos = self.held[b]
        self.held[b] = None
        return b, table, pos, prefetched


class OffloadedExperts(nn.Module):
    """Drop-in for `Experts` whose weights live in (pinned) CPU memory, with `slots` of them cached on `device`.
    See the module docstring for what runs where."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, slots: int, device: torch.device,
                 staging: _Staging, cpu_max_tokens: int = 64, half_life_tokens: float = 512.0,
                 balance: bool = True, bulk: _Bulk | None = None):
        super().__init__()
        E = gate_up.shape[0]
        if not 0 <= slots <= E:
            raise ValueError(f"slots must be in 0..{E}, got {slots}")
        # Plain attributes, not parameters: model.to() and state_dict() must leave the CPU copies where they are.
        self.cpu_gate_up, self.cpu_down = gate_up, down
        self.num_experts, self.num_slots, self.device = E, slots, device
        self.staging, self.cpu_max_tokens, self.balance, self.bulk = staging, cpu_max_tokens, balance, bulk
        self.decay_per_token = 0.5 ** (1.0 / half_life_tokens)
        # Experts 0..slots-1 start resident; frequencies then decide.
        self.gate_up = gate_up[:slots].to(device, copy=True)
        self.down = down[:slots].to(device, copy=True)
        self.slot_of = list(range(slots)) + [-1] * (E - slots)  # expert -> slot or -1, on the host
        self.expert_in = list(range(slots))                       # slot -> expert
        # The same on the device, plus a last entry -1 that skipped pairs (id -1) index.
        self.slot_table = torch.tensor(self.slot_of + [-1], dtype=torch.long, device=device)
        self.freq = torch.zeros(E, dtype=torch.float64)           # decayed token counts per expert
        self.pending: list[torch.cuda.Event] = []                 # promotions the next call must wait for
        self.version = 0                                          # bumped when the resident set changes
        self.stats = OffloadStats()

    @property
    def cache_bytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, H), ids/weights (T, k) on the device -> (T, H). Pairs with id -1 are skipped."""
        if self.num_slots == self.num_experts:  # everything resident, slot e = expert e: no host round trip
            return fused_moe(x, self.gate_up, self.down, ids, weights)
        cuda = self.device.type == "cuda"
        main = torch.cuda.current_stream(self.device) if cuda else None
        for ev in self.pending:  # promotions copied since the last call must land before the slots are read
            main.wait_event(ev)
        self.pending.clear()
        bulk = self.bulk if self.bulk is not None and x.shape[0] >= self.bulk.min_tokens else None
        if bulk is not None:  # copies queued before anything waits for the routing: this layer's, then the next's
            b, table, pos, prefetched = bulk.take(self)
            after = bulk.next_of.get(self)
            if after is not None and after.num_slots < after.num_experts:
                bulk.fill(after, b ^ 1)
        # Routing to the host first, so the wait below does not include the resident experts' compute.
        if cuda:
            ids_h = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True).copy_(ids, non_blocking=True)
            if bulk is None:  # the bulk path computes nothing on the CPU
                w_h = torch.empty(weights.shape, dtype=weights.dtype, pin_memory=True).copy_(weights,
                                                                                             non_blocking=True)
                x_h = torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=True)
            routed = torch.cuda.Event()
            routed.record(main)
        else:
            ids_h, w_h, x_h = ids, weights, x
        out = None
        if self.num_slots:  # 1. resident pairs, queued on the device now
            out = fused_moe(x, self.gate_up, self.down, self.slot_table[ids], weights)
        if cuda:
            routed.synchronize()

        T = ids_h.shape[0]
        flat = ids_h.reshape(-1)
        counts = torch.bincount(flat[flat >= 0], minlength=self.num_experts)
        self.freq.mul_(self.decay_per_token ** T).add_(counts.double())
        used = counts.nonzero().flatten().tolist()
        missing = [e for e in used if self.slot_of[e] < 0]
        on_cpu, copied = ([], missing) if bulk is not None else self._split(missing, counts.tolist())
        s = self.stats
        s.calls += 1
        s.tokens += T
        s.pairs += int(counts.sum())
        s.cpu_pairs += int(counts[on_cpu].sum()) if on_cpu else 0
        s.copied_pairs += int(counts[copied].sum()) if copied else 0
        s.gpu_pairs += int(counts.sum()) - int(counts[missing].sum() if missing else 0)

        if bulk is not None:
            y = self._run_bulk(x, ids, weights, copied, b, table, pos)
            s.bulk_calls += 1
            s.prefetched += prefetched
            s.copied_experts += len(pos)
            if y is not None:
                out = y if out is None else out + y
        elif copied:  # 3. queued on the device (side-stream copies), before the CPU work so that they overlap it
            y = self._run_copied(x, ids, weights, copied)
            out = y if out is None else out + y
        if on_cpu:  # 2. on the CPU while the device works
            y = _cpu_experts(x_h, self.cpu_gate_up, self.cpu_down, ids_h, w_h, on_cpu)
            if cuda:  # uploads from pageable memory would wait for the stream (the copies): stage in pinned memory
                y = torch.empty(y.shape, dtype=x.dtype, pin_memory=True).copy_(y).to(self.device, non_blocking=True)
            else:
                y = y.to(x.dtype)
            out = y if out is None else out + y
            if not copied:
                self._maybe_promote(main)
        if out is None:  # every pair skipped
            out = torch.zeros_like(x)
        return out

    def _split(self, missing: list[int], counts: list[int]) -> tuple[list[int], list[int]]:
        """(computed on the CPU, copied in): see the module docstring."""
        eligible = sorted((e for e in missing if counts[e] <= self.cpu_max_tokens), key=lambda e: counts[e])
        if not self.balance:
            return eligible, [e for e in missing if counts[e] > self.cpu_max_tokens]
        st = self.staging

        def makespan(cpu_time: float, copy_time: float) -> float:
            both = cpu_time > 0 and copy_time > 0
            return max(cpu_time, copy_time) * (st.contention if both else 1.0)

        cpu, cpu_time, copy_time = [], 0.0, st.copy_cost * len(missing)
        best_len, best_time = 0, makespan(0.0, copy_time)
        for e in eligible:  # the CPU share that finishes the layer soonest
            cpu.append(e)
            cpu_time += st.cpu_fixed + st.cpu_per_token * counts[e]
            copy_time -= st.copy_cost
            if makespan(cpu_time, copy_time) < best_time:
                best_len, best_time = len(cpu), makespan(cpu_time, copy_time)
        cpu = cpu[:best_len]
        taken = set(cpu)
        return cpu, [e for e in missing if e not in taken]

    # -- misses copied in ------------------------------------------------------------------------------------
    def _run_copied(self, x, ids, weights, experts: list[int]) -> torch.Tensor:
        st = self.staging
        main = torch.cuda.current_stream(self.device) if st.cuda else None
        order = sorted(experts, key=lambda e: -self.freq[e].item())  # the likeliest admissions first
        groups = [order[g0:g0 + st.group] for g0 in range(0, len(order), st.group)]
        # Each group's expert -> staging slot table (entry E: for id -1), uploaded at once from pinned memory:
        # an upload from pageable memory would wait for the stream, i.e. for the copies in flight.
        tables = torch.full((len(groups), self.num_experts + 1), -1, dtype=torch.long, pin_memory=st.cuda)
        for i, group in enumerate(groups):
            tables[i, group] = torch.arange(len(group))
        tables = tables.to(self.device, non_blocking=True)
        out = None
        for i, group in enumerate(groups):
            b = st.next
            st.next ^= 1
            if st.cuda:
                with torch.cuda.stream(st.stream):
                    st.stream.wait_event(st.free[b])  # the compute that last read this half is done
                    for j, e in enumerate(group):
                        st.gate_up[b, j].copy_(self.cpu_gate_up[e], non_blocking=True)
                        st.down[b, j].copy_(self.cpu_down[e], non_blocking=True)
                    st.ready[b].record(st.stream)
                main.wait_event(st.ready[b])
            else:
                for j, e in enumerate(group):
                    st.gate_up[b, j].copy_(self.cpu_gate_up[e])
                    st.down[b, j].copy_(self.cpu_down[e])
            y = fused_moe(x, st.gate_up[b], st.down[b], tables[i][ids], weights)
            out = y if out is None else out + y
            for j, e in enumerate(group):
                victim = self._victim()
                if victim is not None and self.freq[e] > self.freq[self.expert_in[victim]]:
                    # after this call's resident compute on the same stream, so no reader sees a half-copied slot
                    self.gate_up[victim].copy_(st.gate_up[b, j])
                    self.down[victim].copy_(st.down[b, j])
                    self._assign(victim, e)
                    self.stats.admitted += 1
            if st.cuda:
                st.free[b].record(main)
        self.stats.copied_experts += len(order)
        return out

    # -- bulk path -------------------------------------------------------------------------------------------
    def _run_bulk(self, x, ids, weights, used: list[int], b: int, table: torch.Tensor, pos: dict
                  ) -> torch.Tensor | None:
        """The non-resident pairs over buffer b (all of this layer's non-resident experts, copied by `_Bulk`);
        then the used ones more frequent than the least frequent resident take its slot, as in _run_copied."""
        bk = self.bulk
        main = torch.cuda.current_stream(self.device) if bk.cuda else None
        out = None
        if used:
            if bk.cuda:
                main.wait_event(bk.ready[b])
            out = fused_moe(x, bk.gate_up[b], bk.down[b], table[ids], weights)
            for e in sorted(used, key=lambda e: -self.freq[e].item()):
                victim = self._victim()
                if victim is None or self.freq[e] <= self.freq[self.expert_in[victim]]:
                    break  # the rest are no more frequent
                # on the main stream, after this call's resident compute: no reader sees a half-copied slot
                self.gate_up[victim].copy_(bk.gate_up[b, pos[e]])
                self.down[victim].copy_(bk.down[b, pos[e]])
                self._assign(victim, e)
                self.stats.admitted += 1
        if bk.cuda:
            bk.free[b].record(main)
        return out

    # -- cache bookkeeping -----------------------------------------------------------------------------------
    def _victim(self) -> int | None:
        """The slot of the least frequently used resident expert."""
        if not self.num_slots:
            return None
        return min(range(self.num_slots), key=lambda s: self.freq[self.expert_in[s]].item())

    def _assign(self, slot: int, expert: int) -> None:
        old = self.expert_in[slot]
        self.slot_of[old] = -1
        self.slot_of[expert] = slot
        self.expert_in[slot] = expert
        self.version += 1  # a bulk copy prefetched before this no longer matches the non-resident set
        self.slot_table[old] = -1  # device writes, ordered on the current stream
        self.slot_table[expert] = slot

    def _maybe_promote(self, main) -> None:
        """Start copying the hottest non-resident expert into the coldest slot when it is used at least twice as
        often (the factor keeps near-uniform routing from churning the cache)."""
        victim = self._victim()
        if victim is None:
            return
        cold = self.freq[self.expert_in[victim]].item()
        freq = self.freq.clone()
        freq[[self.expert_in[s] for s in range(self.num_slots)]] = -1
        hot = int(freq.argmax())
        if freq[hot] < max(2.0 * cold, 2.0):
            return
        if main is not None:
            st = self.staging
            done_reading = torch.cuda.Event()
            done_reading.record(main)  # this call's resident compute has been queued before this point
            with torch.cuda.stream(st.stream):
                st.stream.wait_event(done_reading)
                self.gate_up[victim].copy_(self.cpu_gate_up[hot], non_blocking=True)
                self.down[victim].copy_(self.cpu_down[hot], non_blocking=True)
                landed = torch.cuda.Event()
                landed.record(st.stream)
            self.pending.append(landed)
        else:
            self.gate_up[victim].copy_(self.cpu_gate_up[hot])
            self.down[victim].copy_(self.cpu_down[hot])
        self._assign(victim, hot)
        self.stats.promoted += 1


def offload_experts(model: CausalLM, device: str | torch.device, gpu_expert_budget_gb: float,
                    cpu_max_tokens: int = 64, staging_group: int = 4, half_life_tokens: float = 512.0,
                    balance: bool = True, bulk_min_tokens: int | None = 128) -> dict:
    """Turn a model loaded on the CPU into a hybrid one: non-expert weights to `device`, routed experts pinned on
    the host with a device cache of gpu_expert_budget_gb (GB = 1e9 bytes) split evenly over the MoE layers.
    Calls of at least bulk_min_tokens tokens take the bulk path (None: never; its buffers are not in the budget).
    Returns a summary (slots per layer, bytes on the device)."""
    device = torch.device(device)
    if gpu_expert_budget_gb < 0:
        raise ValueError(f"gpu_expert_budget_gb must be >= 0, got {gpu_expert_budget_gb}")
    if cpu_max_tokens < 0 or staging_group < 1:
        raise ValueError(f"cpu_max_tokens must be >= 0 and staging_group >= 1, got {cpu_max_tokens}, {staging_group}")
    if bulk_min_tokens is not None and bulk_min_tokens < 1:
        raise ValueError(f"bulk_min_tokens must be >= 1 or None, got {bulk_min_tokens}")
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        raise ValueError("expert offload needs a mixture-of-experts model; this one has no routed experts")
    first = moes[0].experts
    if first.gate_up_proj.device.type != "cpu":
        raise ValueError("offload_experts expects a model loaded on the CPU (load_model(device='cpu'))")
    E, two_i, H = first.gate_up_proj.shape
    expert_bytes = (first.gate_up_proj[0].nbytes + first.down_proj[0].nbytes)
    slots = min(E, int(gpu_expert_budget_gb * 1e9) // (expert_bytes * len(moes)))
    pin = device.type == "cuda"
    staging = _Staging(min(staging_group, E), two_i, H, two_i // 2, first.gate_up_proj.dtype, device)
    bulk = None
    if bulk_min_tokens is not None and slots < E:
        bulk = _Bulk(E - slots, two_i, H, two_i // 2, first.gate_up_proj.dtype, device, staging.stream,
                     bulk_min_tokens)
    for m in moes:
        gate_up, down = m.experts.gate_up_proj.detach(), m.experts.down_proj.detach()
        del m.experts  # one layer at a time, so pinning never holds two copies of every expert
        if pin:
            gate_up, down = gate_up.pin_memory(), down.pin_memory()
        m.experts = OffloadedExperts(gate_up, down, slots, device, staging, cpu_max_tokens, half_life_tokens,
                                     balance, bulk)
    if bulk is not None:  # modules() lists the layers in the order they run; a wrong order only loses overlap
        bulk.next_of = {a.experts: b.experts for a, b in pairwise(moes)}
    model.to(device)  # everything that is still a parameter or buffer: all but the routed experts
    costs = staging.calibrate(moes[0].experts.cpu_gate_up, moes[0].experts.cpu_down)
    return {"costs": costs, "moe_layers": len(moes), "experts_per_layer": E, "slots_per_layer": slots,
            "expert_bytes": expert_bytes, "gpu_expert_bytes": slots * expert_bytes * len(moes),
            "staging_bytes": staging.nbytes, "bulk_min_tokens": bulk.min_tokens if bulk else None,
            "bulk_bytes": bulk.nbytes if bulk else 0, "cpu_expert_bytes": E * expert_bytes * len(moes)}


def load_offloaded(model_dir: str | Path, device: str | torch.device, dtype: str | torch.dtype | None,
                   gpu_expert_budget_gb: float, **options) -> CausalLM:
    """load_model on the CPU, then `offload_experts` (options: cpu_max_tokens, staging_group, half_life_tokens,
    balance, bulk_min_tokens)."""
    model = load_model(model_dir, device="cpu", dtype=dtype)
    model.offload_summary = offload_experts(model, device, gpu_expert_budget_gb, **options)
    return model


def offload_stats(model: nn.Module, reset: bool = False) -> dict | None:
    """The OffloadStats counters summed over layers, with gpu_hit_rate = gpu_pairs / pairs; None without offload."""
    layers = [m for m in model.modules() if isinstance(m, OffloadedExperts)]
    if not layers:
        return None
    total = {f.name: sum(getattr(m.stats, f.name) for m in layers) for f in fields(OffloadStats)}
    total["gpu_hit_rate"] = total["gpu_pairs"] / total["pairs"] if total["pairs"] else None
    total["resident_experts"] = sum(m.num_slots for m in layers)
    if reset:
        for m in layers:
            m.stats = OffloadStats()
    return total
