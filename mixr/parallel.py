"""Tensor- and expert-parallel inference: a model transform that keeps one rank's shard and adds the collectives.

`shard_model(model, rank, world_size)` rewrites a fully loaded CausalLM in place (Megatron-style, as vLLM does):

  embed_tokens  vocab-parallel: rank r holds rows [r*Vr, (r+1)*Vr), Vr = ceil(V / W) (the last slice is padded
                with zero rows); ids outside the slice look up zeros; all_reduce
  self_attn     heads split: column-parallel q/k/v (GQA: KV heads split too; fewer KV heads than ranks are
                replicated, each on W / num_kv_heads ranks, as in vLLM), or for MLA q_proj / q_b_proj and
                kv_b_proj per head (q_a_proj, kv_a_proj_with_mqa and their norms are replicated: the latent is
                shared by all heads); row-parallel o_proj (its bias on rank 0 only); all_reduce
  mlp (dense)   column-parallel gate/up, row-parallel down (bias on rank 0 only); all_reduce
  mlp (MoE)     experts="tp": every routed expert's intermediate dim split (gate_up rows, down columns);
                experts="ep": rank r keeps experts [r*E/W, (r+1)*E/W) and runs them for every token, the pairs
                routed elsewhere becoming id -1, which fused_moe skips. Shared experts are TP-split in both
                modes, the router and Qwen2-MoE's shared_expert_gate replicated (every rank routes the same);
                one all_reduce sums routed + shared
  lm_head       each rank its vocab slice of logits; all_gather along vocab, padding cut off

`shard_model(..., attention="dp")` is data-parallel attention instead (SGLang's --enable-dp-attention; DeepSeek
serves V3 this way): each rank runs the whole attention, dense MLPs, embedding and shared experts, replicated, for
sequences of its own, with a KV cache of its own (MLA's latent cache is then not held W times, as under TP, where
every rank stores the same latent for its heads). Only the routed experts are split, experts="ep", and tokens travel
to their experts' ranks and back (`DispatchedExperts`); the LM head gathers every rank's last hidden rows to rank 0,
which alone samples (`GatheredLMHead`). No collective is left in attention.

Parameter names stay the checkpoint keys and every forward keeps its signature, so the KV cache and the engine
see the usual modules: head counts stored in modules are the local ones, and `model.config` becomes a copy whose
head counts are local too (cache_shapes() gives this rank's KV shapes; vocab_size stays global, since the
gathered logits are). Sizes that do not divide raise ValueError, except the vocabulary, which is padded.

The collectives run in place on activations, without autograd: a sharded model is for inference (forward under
torch.no_grad or torch.inference_mode).
"""

import dataclasses
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mixr.layers.attention import Attention
from mixr.layers.mla import MLAttention
from mixr.layers.mlp import GatedMLP
from mixr.layers.moe import Experts, MoE
from mixr.models.base import CausalLM


class Comm:
    """The process group a sharded model talks over. Not a module, and deepcopy shares it (engine_model copies
    models to change their dtype; a process group cannot be copied).

    On GPUs, `enable_one_shot` (EngineConfig.custom_all_reduce, opt-in until it has run on a multi-GPU host) adds a
    symmetric-memory buffer (torch.distributed._symmetric_memory, peer-to-peer over NVLink, no multicast): an
    all-reduce that fits it is one kernel that copies this rank's part in, waits for every rank, and sums all parts
    read straight from the peers' buffers (torch's one_shot_all_reduce, with a barrier at its end too, so the buffer
    is free again when it returns). A decode step's all-reduces are that small, and NCCL's take ~15-20 us each
    inside a CUDA graph on 2 x H200 (bench_parallel.py ceilings); larger ones (prefill) go through NCCL."""

    def __init__(self, rank: int, world_size: int, group=None):
        self.rank, self.world_size, self.group = rank, world_size, group
        self.one_shot: torch.Tensor | None = None  # the symmetric buffer, when enabled
        self._group_name = ""

    def __deepcopy__(self, memo):
        return self

    def enable_one_shot(self, device: torch.device, dtype: torch.dtype, max_bytes: int = 1 << 20) -> str | None:
        """Allocate and exchange the symmetric buffer (every rank must call this, in the same order as its other
        collectives). Returns None, or why the one-shot path is not available (NCCL is used then)."""
        try:
            from torch.distributed import _symmetric_memory as symm_mem
            name = (self.group or dist.group.WORLD).group_name
            buf = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
            if symm_mem.rendezvous(buf, name) is None:
                return "symmetric-memory rendezvous returned no handle"
            torch.ops.symm_mem.one_shot_all_reduce_copy_out  # noqa: B018 (AttributeError on a torch without it)
        except (AttributeError, ImportError, RuntimeError) as e:
            return f"{type(e).__name__}: {e}"
        self.one_shot, self._group_name = buf, name
        return None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        _check_no_grad(x)
        if not x.is_contiguous():
            x = x.contiguous()
        buf = self.one_shot
        if buf is not None and x.dtype == buf.dtype and x.numel() <= buf.numel() and x.device == buf.device:
            flat = x.view(-1)
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(buf[:flat.numel()], flat, "sum", self._group_name, flat)
            return x
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(n, ...) on every rank, n the same everywhere -> (world_size * n, ...), rank order."""
        _check_no_grad(x)
        out = x.new_empty((self.world_size * x.shape[0], *x.shape[1:]))
        _ALL_GATHER(out, x.contiguous(), group=self.group)
        return out

    def reduce_scatter_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(world_size * n, ...) on every rank -> this rank's n rows of the sum over ranks."""
        _check_no_grad(x)
        out = x.new_empty((x.shape[0] // self.world_size, *x.shape[1:]))
        _REDUCE_SCATTER(out, x.contiguous(), group=self.group)
        return out

    def all_to_all_rows(self, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        """Rows send[0] to rank 0, the next send[1] to rank 1, ...; returns the rows received, recv[r] from rank r,
        in rank order."""
        _check_no_grad(x)
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=self.group)
        return out

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n) on every rank -> (..., world_size * n), rank order."""
        _check_no_grad(x)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)

    def reduce_hook(self, module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
        """Forward hook: a module's partial sum (row-parallel output) -> the full output on every rank."""
        return self.all_reduce(out)


# torch 2.13 renames these (the old names warn); 2.11 has only the old ones
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _check_no_grad(x: torch.Tensor) -> None:
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("a sharded model's collectives have no backward: run it under torch.no_grad or "
                           "torch.inference_mode")


class VocabParallelEmbedding(nn.Module):
    """Rank r's rows [start, start + weight.shape[0]) of the embedding; other ids look up zeros, and the
    all_reduce fills them in from the rank that holds them."""

    def __init__(self, weight: torch.Tensor, start: int, comm: Comm):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
        self.start, self.comm = start, comm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)  # (B, L, hidden)
        return self.comm.all_reduce(x * inside[..., None].to(x.dtype))


class ParallelLMHead(nn.Module):
    """Rank r's vocab slice of the LM head; the logits of all ranks gathered along vocab, padding cut off."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, comm: Comm):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.vocab_size, self.comm = vocab_size, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_gather_last(F.linear(x, self.weight))[..., :self.vocab_size]


class LocalExperts(Experts):
    """Expert parallelism: experts [first, first + E_local) of the model's E. Ids arrive global; the pairs of
    other ranks' experts become -1, which every fused_moe path skips."""

    def __init__(self, experts: Experts, first: int, count: int):
        nn.Module.__init__(self)
        self.first = first
        self.gate_up_proj = _param(experts.gate_up_proj, experts.gate_up_proj[first:first + count])
        self.down_proj = _param(experts.down_proj, experts.down_proj[first:first + count])

    def forward(self, x, ids, weights, shared=None):
        local = ids - self.first
        local = torch.where((local >= 0) & (local < self.gate_up_proj.shape[0]), local, -1)  # -1 stays -1
        return super().forward(x, local, weights, shared=shared)


class DispatchedExperts(LocalExperts):
    """Expert parallelism under data-parallel attention: rank r holds experts [first, first + E_local) and tokens of
    its own, routed by its own copy of the router; each (token, expert) pair is computed on its expert's rank and
    the weighted results come back to the token's rank.

    Eager forwards (prefill, CPU) dispatch with all-to-all: a token travels once to each rank that holds one of its
    experts, with those experts' ids and weights, and one row of summed results comes back (the row counts are
    exchanged first: one host sync). Inside a CUDA graph (decode), whose shapes cannot depend on the routing, every
    rank's rows are all-gathered instead, each rank runs its experts' pairs of all of them, and a reduce-scatter
    returns each rank its rows' sums: that needs the same row count on every rank, which the runner's padding gives.
    `dispatch` forces one way ("all_to_all", "all_gather") for tests; the results agree up to summation order.

    The shared experts are not here: they run replicated, on each rank's own tokens, in MoE.forward."""

    shared_operands = None  # MoE.forward then runs the shared expert itself, on this rank's tokens

    def __init__(self, experts: Experts, first: int, count: int, comm: Comm, dispatch: str = "auto"):
        super().__init__(experts, first, count)
        self.comm, self.dispatch = comm, dispatch

    def forward(self, x, ids, weights, shared=None):
        if shared is not None:
            raise ValueError("DispatchedExperts runs no shared expert")
        gathered = self.dispatch == "all_gather" or (
            self.dispatch == "auto" and x.is_cuda and torch.cuda.is_current_stream_capturing())
        return self._gathered(x, ids, weights) if gathered else self._all_to_all(x, ids, weights)

    def _gathered(self, x, ids, weights):
        xs, all_ids, all_weights = _unpack(self.comm.all_gather_rows(_pack(x, ids, weights)), (x, ids, weights))
        return self.comm.reduce_scatter_rows(super().forward(xs, all_ids, all_weights))

    def _all_to_all(self, x, ids, weights):
        W, n = self.comm.world_size, self.gate_up_proj.shape[0]
        owner = torch.where(ids >= 0, ids // n, -1)  # (T, k): the rank of each pair's expert
        to = (owner[..., None] == torch.arange(W, device=x.device)).any(1)  # (T, W): token t goes to rank r
        dest, rows = to.t().nonzero(as_tuple=True)  # by destination rank, tokens in order within each
        counts = to.sum(0)
        recv = self.comm.all_to_all_rows(counts, [1] * W, [1] * W)  # each rank's count for this one
        send, recv = counts.tolist(), recv.tolist()
        mine = owner[rows] == dest[:, None]  # (S, k): the pairs each sent row runs on its destination
        local = torch.where(mine, ids[rows] - dest[:, None] * n, -1).to(ids.dtype)
        packed = _pack(x[rows], local, torch.where(mine, weights[rows], 0))
        xr, ir, wr = _unpack(self.comm.all_to_all_rows(packed, send, recv), (x, ids, weights))
        out = self.comm.all_to_all_rows(Experts.forward(self, xr, ir, wr), recv, send)  # (S, H), back home
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, rows, out.float())
        return y.to(x.dtype)


def _pack(*tensors: torch.Tensor) -> torch.Tensor:
    """Tensors of T rows each, any dtypes -> (T, bytes) uint8: one collective for all of them."""
    return torch.cat([t.contiguous().view(torch.uint8).reshape(t.shape[0], _row_bytes(t)) for t in tensors], dim=1)


def _row_bytes(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:]) * t.element_size()


def _unpack(packed: torch.Tensor, like: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """_pack's inverse for tensors of `like`'s dtypes and row shapes, packed.shape[0] rows each."""
    out, at = [], 0
    for t in like:
        width = _row_bytes(t)
        out.append(packed[:, at:at + width].reshape(-1).view(t.dtype).view(packed.shape[0], *t.shape[1:]))
        at += width
    return out


class GatheredLMHead(nn.Module):
    """Data-parallel attention's LM head: every rank's rows of last hidden states gathered (the same row count on
    every rank: the runner pads), and rank 0, which alone samples, computes the logits of all of them in rank order;
    the other ranks return (world_size * n, 0)."""

    def __init__(self, weight: torch.Tensor, comm: Comm):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.comm.all_gather_rows(x.reshape(-1, x.shape[-1]))
        return F.linear(rows, self.weight) if self.comm.rank == 0 else rows[:, :0]


def _param(old: torch.Tensor, value: torch.Tensor) -> nn.Parameter:
    # clone: a contiguous tensor of its own, so the full weight can be freed
    return nn.Parameter(value.clone(), requires_grad=old.requires_grad)


def _rows(linear: nn.Module, start: int, stop: int) -> None:
    """Column parallel: keep output features [start, stop)."""
    linear.weight = _param(linear.weight, linear.weight[start:stop])
    if linear.bias is not None:
        linear.bias = _param(linear.bias, linear.bias[start:stop])
    linear.out_features = stop - start


def _cols(linear: nn.Module, start: int, stop: int, rank: int) -> None:
    """Row parallel: keep input features [start, stop); the bias is added once, by rank 0."""
    linear.weight = _param(linear.weight, linear.weight[:, start:stop])
    if linear.bias is not None and rank != 0:
        linear.bias = None
    linear.in_features = stop - start


def _split(n: int, world_size: int, what: str) -> int:
    if n % world_size:
        raise ValueError(f"{what}={n} is not divisible by world_size={world_size}")
    return n // world_size


def check_shardable(model: CausalLM, world_size: int, experts: str, attention: str = "tp") -> None:
    """Raise ValueError / TypeError / NotImplementedError unless shard_model can shard `model` so (every size and
    module type, checked before anything changes: a model that cannot be sharded is left intact). A meta-device
    model will do: the engine checks this before it starts any worker."""
    if experts not in ("tp", "ep"):
        raise ValueError(f"experts must be 'tp' or 'ep', got {experts!r}")
    if attention not in ("tp", "dp"):
        raise ValueError(f"attention must be 'tp' or 'dp', got {attention!r}")
    if attention == "dp":
        if experts != "ep":
            raise ValueError("data-parallel attention splits the routed experts by expert: experts='ep'")
        moes = [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoE)]
        if not moes:
            raise ValueError("data-parallel attention needs a MoE model: a dense one would be W replicas")
        for i, moe in moes:
            _check_experts(i, moe, world_size, experts)
        return
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if isinstance(attn, Attention):
            _split(attn.num_heads, world_size, f"layer {i}: num_attention_heads")
            kv = attn.num_kv_heads
            if kv >= world_size:
                _split(kv, world_size, f"layer {i}: num_key_value_heads")
            elif world_size % kv:
                raise ValueError(f"layer {i}: num_key_value_heads={kv} does not divide world_size={world_size} "
                                 "(fewer KV heads than ranks are replicated, each on world_size / num_key_value_heads "
                                 "ranks)")
            if attn.qk_norm == "full":
                raise NotImplementedError("tensor parallelism with a full-width Q/K norm (OLMoE) needs a "
                                          "cross-rank RMSNorm, which is not implemented")
            linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        elif isinstance(attn, MLAttention):
            _split(attn.num_heads, world_size, f"layer {i}: num_attention_heads")
            linears = (attn.kv_b_proj, attn.o_proj, attn.q_proj if attn.q_lora_rank is None else attn.q_b_proj)
        else:
            raise TypeError(f"layer {i}: cannot shard attention of type {type(attn).__name__}")
        mlps = []
        if isinstance(mlp, GatedMLP):
            mlps.append(("intermediate_size", mlp))
        elif isinstance(mlp, MoE):
            _check_experts(i, mlp, world_size, experts)
            for name in ("shared_experts", "shared_expert"):
                if hasattr(mlp, name):
                    mlps.append((f"{name} intermediate size", getattr(mlp, name)))
        else:
            raise TypeError(f"layer {i}: cannot shard an MLP of type {type(mlp).__name__}")
        for what, m in mlps:
            _split(m.gate_proj.out_features, world_size, f"layer {i}: {what}")
            linears += (m.gate_proj, m.up_proj, m.down_proj)
        for lin in linears:
            if type(lin) is not nn.Linear:
                raise TypeError(f"layer {i}: cannot shard a {type(lin).__name__} (shard before quantizing)")
    if type(model.model.embed_tokens) is not nn.Embedding or type(model.lm_head) is not nn.Linear:
        raise TypeError("cannot shard the embedding / lm_head: expected nn.Embedding and nn.Linear")


def _check_experts(i: int, moe: MoE, world_size: int, experts: str) -> None:
    if type(moe.experts) is not Experts:
        raise TypeError(f"layer {i}: cannot shard experts of type {type(moe.experts).__name__} (shard before "
                        "quantizing or offloading)")
    E, two_i, _ = moe.experts.gate_up_proj.shape
    if experts == "tp":
        _split(two_i // 2, world_size, f"layer {i}: moe_intermediate_size")
    else:
        _split(E, world_size, f"layer {i}: number of routed experts")


def _shard_mlp(mlp: GatedMLP, rank: int, world_size: int) -> None:
    n = mlp.gate_proj.out_features // world_size
    _rows(mlp.gate_proj, rank * n, (rank + 1) * n)
    _rows(mlp.up_proj, rank * n, (rank + 1) * n)
    _cols(mlp.down_proj, rank * n, (rank + 1) * n, rank)


def _first_kv_head(rank: int, world_size: int, kv_heads: int) -> int:
    """The first KV head rank keeps: its block of kv_heads / world_size, or, with fewer KV heads than ranks, the one
    head it shares with world_size / kv_heads ranks (what _shard_attention keeps and shard_of cuts)."""
    return rank * (kv_heads // world_size) if kv_heads >= world_size else rank // (world_size // kv_heads)


def _shard_attention(attn: nn.Module, rank: int, world_size: int) -> None:
    H = attn.num_heads // world_size
    if isinstance(attn, Attention):
        D, KV = attn.head_dim, max(1, attn.num_kv_heads // world_size)
        # q head h reads KV head h // (heads per KV head): a contiguous block of q heads reads a contiguous block
        # of KV heads, so both split the same way. With fewer KV heads than ranks (Qwen3-235B's 4 on 8 GPUs, as
        # vLLM does it) rank r keeps the one KV head its q heads read, which world_size / num_kv_heads ranks share.
        first = _first_kv_head(rank, world_size, attn.num_kv_heads)
        _rows(attn.q_proj, rank * H * D, (rank + 1) * H * D)
        _rows(attn.k_proj, first * D, (first + KV) * D)
        _rows(attn.v_proj, first * D, (first + KV) * D)
        _cols(attn.o_proj, rank * H * D, (rank + 1) * H * D, rank)
        attn.num_heads, attn.num_kv_heads = H, KV
    else:  # MLA: per-head weights are head-major blocks of rows (q, kv_b) or columns (o)
        dq = attn.qk_nope_head_dim + attn.qk_rope_head_dim
        dkv = attn.qk_nope_head_dim + attn.v_head_dim
        _rows(attn.q_proj if attn.q_lora_rank is None else attn.q_b_proj, rank * H * dq, (rank + 1) * H * dq)
        _rows(attn.kv_b_proj, rank * H * dkv, (rank + 1) * H * dkv)
        _cols(attn.o_proj, rank * H * attn.v_head_dim, (rank + 1) * H * attn.v_head_dim, rank)
        attn.num_heads = H


def _shard_moe(moe: MoE, rank: int, world_size: int, experts: str) -> None:
    ex = moe.experts
    E, two_i, _ = ex.gate_up_proj.shape
    if experts == "ep":
        n = E // world_size
        moe.experts = LocalExperts(ex, rank * n, n)
    else:
        I, n = two_i // 2, two_i // 2 // world_size
        lo, hi = rank * n, (rank + 1) * n
        gate_up = torch.cat((ex.gate_up_proj[:, lo:hi], ex.gate_up_proj[:, I + lo:I + hi]), dim=1)  # (E, 2n, H)
        ex.gate_up_proj = _param(ex.gate_up_proj, gate_up)
        ex.down_proj = _param(ex.down_proj, ex.down_proj[:, :, lo:hi])
    for name in ("shared_experts", "shared_expert"):
        if hasattr(moe, name):
            _shard_mlp(getattr(moe, name), rank, world_size)


def shard_of(name: str, full: torch.Tensor, shape: torch.Size, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s part of the full tensor `name` whose shard has `shape`, cut as mixr.parallel.shard_model cuts
    it: the whole tensor where the shapes agree (replicated tensors; rank 0's row-parallel biases); else the one
    axis that differs in world_size slices of ceil(size / world_size) (the vocabulary's last one padded with
    zeros), except a TP-split expert's gate_up_proj (E, 2I, H), whose shard is the same slice of the gate half and
    of the up half, and the K/V projections of fewer KV heads than ranks, each head's rows on world_size / heads
    ranks."""
    if full.shape == shape:
        return full
    axes = [d for d, (a, b) in enumerate(zip(full.shape, shape)) if a != b]
    if name.rpartition(".")[0].endswith(("k_proj", "v_proj")) and axes == [0] and full.shape[0] % shape[0] == 0:
        heads = full.shape[0] // shape[0]  # KV heads (one per rank) fewer than ranks: replicated (_shard_attention)
        if heads < world_size and world_size % heads == 0:
            return full.narrow(0, _first_kv_head(rank, world_size, heads) * shape[0], shape[0])
    if full.dim() != len(shape) or len(axes) != 1 or -(-full.shape[axes[0]] // world_size) != shape[axes[0]]:
        raise ValueError(f"{name} has shape {tuple(full.shape)}, which is not the whole of this "
                         f"rank's shard {tuple(shape)} (world_size {world_size})")
    d, n = axes[0], shape[axes[0]]
    if name.endswith("gate_up_proj") and d == 1:
        h, I = n // 2, full.shape[1] // 2
        return torch.cat((full[:, rank * h:(rank + 1) * h], full[:, I + rank * h:I + (rank + 1) * h]), dim=1)
    part = full.narrow(d, rank * n, max(0, min(n, full.shape[d] - rank * n)))
    if part.shape[d] < n:
        pad = list(full.shape)
        pad[d] = n - part.shape[d]
        part = torch.cat((part, full.new_zeros(pad)), dim=d)
    return part


def _local_config(config, world_size: int):
    """A copy of the config with this rank's head counts, what cache_shapes() reads."""
    changes = {k: max(1, getattr(config, k) // world_size) for k in ("num_attention_heads", "num_key_value_heads")
               if getattr(config, k, None) is not None}  # KV heads: at least one (replicated)
    return dataclasses.replace(config, **changes)


@torch.no_grad()
def shard_model(model: CausalLM, rank: int, world_size: int, experts: str = "tp", group=None,
                attention: str = "tp") -> CausalLM:
    """Keep rank `rank`'s shard of a fully loaded `model` (in place) and return it; see the module docstring.

    experts: "tp" splits every routed expert's intermediate dim across ranks, "ep" gives each rank E/world_size
    whole experts. attention: "tp" splits heads, "dp" replicates attention for data-parallel ranks (experts="ep").
    group: the torch.distributed process group of the world_size ranks (default: the world); every rank must call
    this with the same arguments but its own rank. Raises ValueError when the heads, intermediate sizes or (for
    "ep") the expert count do not divide by world_size, or the KV heads neither divide it nor are divided by it;
    the vocabulary is padded.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in 0..{world_size - 1}")
    if getattr(model, "parallel", None) is not None:
        raise ValueError(f"the model is already sharded ({model.parallel})")
    if dist.is_initialized() and (dist.get_world_size(group), dist.get_rank(group)) != (world_size, rank):
        raise ValueError(f"rank={rank}, world_size={world_size} disagree with the process group's "
                         f"rank={dist.get_rank(group)}, size={dist.get_world_size(group)}")
    check_shardable(model, world_size, experts, attention)
    if world_size == 1:
        return model
    comm = Comm(rank, world_size, group)
    if attention == "dp":
        for layer in model.model.layers:
            if isinstance(layer.mlp, MoE):
                n = layer.mlp.experts.gate_up_proj.shape[0] // world_size
                layer.mlp.experts = DispatchedExperts(layer.mlp.experts, rank * n, n, comm)
        model.lm_head = GatheredLMHead(model.lm_head.weight, comm)  # tied embeddings stay tied
        model.parallel = (rank, world_size, experts, attention)
        return model
    for layer in model.model.layers:
        _shard_attention(layer.self_attn, rank, world_size)
        if isinstance(layer.mlp, MoE):
            _shard_moe(layer.mlp, rank, world_size, experts)
        else:
            _shard_mlp(layer.mlp, rank, world_size)
        layer.self_attn.register_forward_hook(comm.reduce_hook)
        layer.mlp.register_forward_hook(comm.reduce_hook)  # MoE: routed + shared partial sums, one all_reduce

    emb, V = model.model.embed_tokens.weight, model.config.vocab_size
    n = -(-V // world_size)  # ceil: the last rank's slice is padded with zero rows
    part = emb[rank * n:(rank + 1) * n]
    part = torch.cat((part, part.new_zeros(n - part.shape[0], part.shape[1])))
    tied = model.lm_head.weight is emb
    model.model.embed_tokens = VocabParallelEmbedding(part.requires_grad_(emb.requires_grad), rank * n, comm)
    if tied:
        head = model.model.embed_tokens.weight
    else:
        head = model.lm_head.weight[rank * n:(rank + 1) * n]
        head = _param(model.lm_head.weight, torch.cat((head, head.new_zeros(n - head.shape[0], head.shape[1]))))
    model.lm_head = ParallelLMHead(head, V, comm)

    model.config = _local_config(model.config, world_size)
    model.parallel = (rank, world_size, experts, attention)
    return model
