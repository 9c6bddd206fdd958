"""The one place that touches the device: KV-cache allocation, input tensors, forward, sampling, CUDA graphs."""

import itertools
from collections.abc import Callable

import torch

from mixr.engine.block_manager import slot_mapping
from mixr.engine.paged_cache import PagedCache, PagedStep, StepMeta
from mixr.engine.sequence import Sequence
from mixr.kernels.gemv import install_skinny
from mixr.layers.mla import MLAttention
from mixr.models.base import CausalLM
from mixr.sampling import PendingSample, SampleRequest

# Prompt chunks of at most DECODE_CHUNK tokens, whose rows read at most DECODE_CHUNK_READS cached tokens in all, run as
# decode rows through the graphs (ModelRunner.fits_decode). 2^18 reads of MLA's 1152-byte rows are 0.3 GB a layer.
DECODE_CHUNK = 512
DECODE_CHUNK_READS = 1 << 18
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
CHUNK_GRAPH_SIZES = (16, 32, 64, 128, 256, 512)


class ModelRunner:
    def __init__(self, model: CausalLM, block_size: int, max_model_len: int, max_num_seqs: int,
                 max_num_batched_tokens: int, gpu_memory_utilization: float = 0.9,
                 kv_cache_bytes: int | None = None, cuda_graphs: bool = True, kv_cache_dtype: str = "auto",
                 min_over_ranks: Callable[[int], int] | None = None):
        self.model, self.block_size, self.max_model_len = model, block_size, max_model_len
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        # Decode-sized linears on Triton GEMVs where this GPU times them faster than cuBLAS (measured per shape, before
        # the KV budget is taken, so the timing's weight copies are freed by then).
        self.skinny_report: dict = {}
        if cuda_graphs and self.device.type == "cuda":
            # MLA's two projections of x as one GEMM (before install_skinny, which wants plain nn.Linear)
            for m in model.modules():
                if isinstance(m, MLAttention):
                    m.fuse_input_projections()
            install_skinny(model, report=self.skinny_report)
        self.kv_dtype = torch.float8_e4m3fn if kv_cache_dtype == "fp8" else self.dtype
        shapes = model.config.cache_shapes()
        num_layers = len(model.model.layers)
        self.kv_bytes_per_token = PagedCache.bytes_per_token(num_layers, shapes, self.kv_dtype)
        if kv_cache_bytes is not None:
            budget = kv_cache_bytes
        else:
            budget = self._free_memory(gpu_memory_utilization, max_num_batched_tokens)
            # Never more than every running sequence at full length could hold, twice over for the prefix cache:
            # on a CPU this keeps a 2 GiB zero-fill from dominating start-up for small models.
            budget = min(budget, 2 * max_num_seqs * max_model_len * self.kv_bytes_per_token)
            if min_over_ranks is not None:  # tensor parallel: rank 0's block tables must hold on every rank
                budget = min_over_ranks(budget)
        self.num_blocks = int(budget // (self.kv_bytes_per_token * block_size))
        if self.num_blocks < 1:
            raise MemoryError(f"no memory left for the KV cache (budget {budget / 2**20:.0f} MiB, "
                              f"{self.kv_bytes_per_token * block_size} bytes per block)")
        self.cache = PagedCache(num_layers, self.num_blocks, block_size, shapes, self.dtype, self.device,
                                kv_dtype=self.kv_dtype)
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Graphs need a forward with no host sync: the Triton kernels, which run for bf16/fp16 only.
        if cuda_graphs and self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16):
            try:
                # past max_num_seqs, a few sizes for prompt chunks as decode rows (fits_decode): an eager prefill is
                # host-bound, ~60 ms for 128-512 tokens of V2-Lite on an H100, against 14-20 ms as graph rows
                # (bench/bench_ttft.py)
                self._capture([b for b in GRAPH_BATCH_SIZES if b <= max_num_seqs] +
                              [b for b in CHUNK_GRAPH_SIZES if max_num_seqs < b <= min(DECODE_CHUNK,
                                                                                       max_num_batched_tokens)])
            except RuntimeError as e:  # e.g. no Triton: the reference kernels sync the host
                import warnings
                warnings.warn(f"CUDA graph capture failed, decoding eagerly: {e}")
                self.graphs.clear()

    # -- memory ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _free_memory(self, utilization: float, max_tokens: int) -> int:
        """Bytes for the KV cache on a CPU (a fixed 2 GiB budget) or a GPU: utilization x total, minus what the
        weights and the activations of the largest prefill (measured by running one) take."""
        if self.device.type != "cuda":
            return 2 << 30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        ids = torch.zeros(1, max_tokens, dtype=torch.long, device=self.device)
        self.model.lm_head(self.model.hidden_states(ids)[:, -1])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        return max(0, int(total * utilization) - peak - used_by_others)

    # -- inputs ------------------------------------------------------------------------------------------------
    def _tensor(self, rows, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(rows, dtype=dtype).to(self.device, non_blocking=True)

    def _prefill_inputs(self, seqs: list[Sequence], counts: list[int]):
        scratch = self.cache.scratch_slot
        if not seqs:  # a data-parallel rank with no prompt this step: one padding token joins the collectives
            zero, slot = self._tensor([[0]]), self._tensor([[scratch]])
            return zero, zero, StepMeta(decode=False, slots=slot, gather=slot), self._tensor([])
        L = max(counts)
        S = max(s.num_computed_tokens + n for s, n in zip(seqs, counts))
        ids, pos, slots, gather = [], [], [], []
        for s, n in zip(seqs, counts):
            start = s.num_computed_tokens
            pad = L - n
            ids.append(s.token_ids[start:start + n] + [0] * pad)
            pos.append(list(range(start, start + L)))
            slots.append(slot_mapping(s.block_table, self.block_size, start, start + n) + [scratch] * pad)
            ctx = slot_mapping(s.block_table, self.block_size, 0, start + n)
            gather.append(ctx + [scratch] * (S - len(ctx)))
        meta = StepMeta(decode=False, slots=self._tensor(slots), gather=self._tensor(gather))
        last = self._tensor([n - 1 for n in counts])
        return self._tensor(ids), self._tensor(pos), meta, last

    def _decode_inputs(self, seqs: list[Sequence], batch: int, counts: list[int] | None = None,
                       ahead: bool = False):
        """Decode rows padded to `batch` rows (a captured graph size); padding rows write to the scratch slot.
        A sequence is one row at its last token, or counts[i] rows at positions [num_computed_tokens, +counts[i])
        (a short prompt chunk: each row attends to the rows before it, whose KV the layer stores first).
        ahead: each sequence is one token further on (a step still running samples that token; the caller feeds
        it), so positions, slots and context lengths count it. Two host-to-device copies: one per dtype."""
        bs, scratch = self.block_size, self.cache.scratch_slot
        width = max((len(s.block_table) for s in seqs), default=1)  # columns past a row's context are never read
        ids, pos, slots, lens, tables = [], [], [], [], []
        for i, s in enumerate(seqs):
            table, toks = s.block_table, s.token_ids
            if len(table) < width:
                table = table + [0] * (width - len(table))
            if counts is None:  # token_ids may hold just the last token (a tensor-parallel worker's rows)
                start, n = s.num_tokens - 1 + ahead, 1
                ids.append(0 if ahead else toks[-1])
            else:
                start, n = s.num_computed_tokens, counts[i]
                ids += toks[start:start + n]
            for p in range(start, start + n):
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
                lens.append(p + 1)
                tables += table
        pad = batch - len(ids)
        if pad:
            ids += [0] * pad
            pos += [0] * pad
            slots += [scratch] * pad
            lens += [1] * pad
            tables += [0] * (width * pad)
        longs = self._tensor(ids + pos + slots).view(3, batch, 1)
        ints = self._tensor(lens + tables, torch.int32)
        return longs, ints[batch:].view(batch, width), ints[:batch]

    # -- forward -----------------------------------------------------------------------------------------------
    def _decode_logits(self, ids, pos, meta: StepMeta) -> torch.Tensor:
        hidden = self.model.hidden_states(ids, pos, PagedStep(self.cache, meta))
        return self.model.lm_head(hidden[:, -1])

    @torch.inference_mode()
    def _capture(self, sizes: list[int]) -> None:
        B = max(sizes)
        dev = self.device
        self.g_longs = torch.zeros(3, B, 1, dtype=torch.long, device=dev)  # ids, positions, slots
        self.g_longs[2] = self.cache.scratch_slot
        g_ids, g_pos, g_slots = self.g_longs
        self.g_tables = torch.zeros(B, self.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.g_lens = torch.ones(B, dtype=torch.int32, device=dev)
        self.g_out: dict[int, torch.Tensor] = {}
        pool = None
        for b in sorted(sizes, reverse=True):  # largest first, so smaller graphs reuse its memory pool
            meta = StepMeta(True, g_slots[:b], self.g_tables[:b], self.g_lens[:b])
            self._decode_logits(g_ids[:b], g_pos[:b], meta)  # warm up kernels (autotune, lazy init)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.g_out[b] = self._decode_logits(g_ids[:b], g_pos[:b], meta)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(dev)

    def fits_decode(self, seqs: list[Sequence], counts: list[int]) -> bool:
        """Whether a step of counts[i] tokens for seqs[i] runs as decode rows in a captured graph (`decode` with
        counts). A prompt chunk's eager forward costs ~1 ms of host launches per layer on an H100 host whatever its
        length, while a graph replay at its row count costs what its weights and KV reads cost; but each decode row
        reads its whole context, so chunks that are long, or sit after a long context, keep the prefill path."""
        if not self.graphs or sum(counts) > max(self.graphs) or max(counts) > DECODE_CHUNK:
            return False
        return sum(n * (s.num_computed_tokens + n) for s, n in zip(seqs, counts) if n > 1) <= DECODE_CHUNK_READS

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], next_ids: torch.Tensor | None = None,
               counts: list[int] | None = None, rows: int | None = None) -> torch.Tensor:
        """Logits (len(seqs), vocab) for each sequence's next token.
        next_ids (len(seqs),), on the device: feed these instead of the last tokens, one position further on;
        they are the tokens of a step still running, which the host has not seen (LLMEngine's async scheduling).
        counts: feed each sequence counts[i] tokens from num_computed_tokens on, one row each (see fits_decode);
        the logits are those of each sequence's last row.
        rows: data-parallel attention: run at least this many rows (every rank the same) and return the LM head's
        output as it is: all ranks' rows, in rank order, each rank's padded to the same count (GatheredLMHead)."""
        n = len(seqs) if counts is None else sum(counts)
        want = max(n, rows or 0)
        size = next((b for b in sorted(self.graphs) if b >= want), None)
        longs, tables, lens = self._decode_inputs(seqs, size or want, counts, ahead=next_ids is not None)
        if size is None:
            if next_ids is not None:
                longs[0, :, 0] = next_ids
            ids, pos, slots = longs
            out = self._decode_logits(ids, pos, StepMeta(True, slots, tables, lens))
        else:
            self.g_longs[:, :size].copy_(longs)
            if next_ids is not None:
                self.g_longs[0, :n, 0] = next_ids
            self.g_tables[:size, :tables.shape[1]].copy_(tables)
            self.g_lens[:size].copy_(lens)
            self.graphs[size].replay()
            out = self.g_out[size]
        if rows is not None:
            return out
        if counts is None:
            return out[:n]
        return out[torch.tensor(list(itertools.accumulate(counts)), device=out.device) - 1]

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], counts: list[int], rows: int | None = None) -> torch.Tensor:
        """Logits of each sequence's last fed token. rows: data-parallel attention, as in `decode`: this rank's
        len(seqs) <= rows last hidden states padded to rows, and the LM head's output returned as it is."""
        ids, pos, meta, last = self._prefill_inputs(seqs, counts)
        hidden = self.model.hidden_states(ids, pos, PagedStep(self.cache, meta))
        hidden = hidden[torch.arange(len(seqs), device=self.device), last]
        if rows is not None:
            hidden = torch.nn.functional.pad(hidden, (0, 0, 0, rows - len(seqs)))
        return self.model.lm_head(hidden)

    def sample(self, logits: torch.Tensor, reqs: list[SampleRequest]) -> PendingSample:
        return PendingSample(logits, reqs)
