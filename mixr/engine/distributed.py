"""Tensor-, expert- and data-parallel engines: one process per GPU, the scheduler in rank 0 alone.

LLMEngine(model_dir, config=EngineConfig(tensor_parallel_size=N)) makes its own process rank 0 and starts ranks
1..N-1 (`Workers`: torch.multiprocessing's spawn, rank r on cuda:r). Every rank loads the checkpoint itself, keeps
its shard (mixr.parallel.shard_model: TP attention and MLPs, vocab-parallel embedding and LM head, TP or EP
experts) and builds its own ModelRunner; the KV caches get the same number of blocks on every rank (the smallest
budget of all), so rank 0's block tables hold everywhere. Then each forward of rank 0 (`ParallelRunner`) first
writes one step message, pickled once, to every worker's pipe:

    ("decode", [(last token id, sequence length, block table), ...], pad)     a row per sequence
    ("rows", [(chunk token ids, first position, block table), ...], pad)      short prompt chunks as decode rows
    ("prefill", [(chunk token ids, first position, block table), ...], pad)

and every rank runs that forward. The collectives inside the sharded model (torch.distributed: NCCL on GPUs, gloo
on CPUs) leave the whole logits on every rank; rank 0 alone samples. pad is None, except under data-parallel
attention (EngineConfig.parallel_attention="dp", `DataParallelRunner`): there each rank is sent the rows of its
own sequences, whose KV cache it holds (rank 0's scheduler keeps a block pool per rank), and pad is the row count
every rank runs, its own rows padded, so that the collectives of the routed experts and the LM head line up.
update_weights broadcasts each full tensor over torch.distributed and every rank copies its own shard of it
(`shard_of`).

A failure is an error in rank 0, never a hang. A worker that raises sends its traceback and exits; a thread in rank
0 waits on the workers' reply pipes and process sentinels and records the first failure (an exception, a death by
a signal); with NCCL it also aborts the process group, so that nothing in rank 0 stays blocked on the dead peer
(gloo fails the collective by itself when the peer's connection closes). Rank 0 then raises WorkerError at its
next call, or at once when its collective fails, and at every call after; the workers left are stopped.
`Workers.failed` (an Event) lets a server exit. Workers exit when rank 0 closes them (LLM.close, garbage
collection, interpreter exit) or dies (their pipe closes).
"""

import contextlib
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Iterable, Mapping
from datetime import timedelta
from multiprocessing import connection
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm import tqdm

from mixr.checkpoint import load_model, parse_config, read_config
from mixr.engine.model_runner import ModelRunner
from mixr.layers.moe import set_dynamic_experts
from mixr.models.base import CausalLM
from mixr.parallel import check_shardable, shard_model, shard_of

HOST = "127.0.0.1"
# A collective or a reply that waits this long fails: it bounds a peer that hangs without dying (one that dies is
# noticed at once). It must cover one rank still loading the checkpoint while another waits in the first collective.
TIMEOUT = timedelta(minutes=10)
# NVLink multicast (NVLS, symmetric-memory multicast) stays off on the multi-GPU hosts mixr runs on.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


class WorkerError(RuntimeError):
    """A tensor-parallel rank failed; the engine cannot run any more."""


def load_shard(model_dir: str | Path, device: torch.device, dtype, config, rank: int) -> CausalLM:
    """Rank `rank`'s shard of a checkpoint, on `device`. Each rank reads only its own part of every tensor
    (load_model's shard=), except with an adapter: that is merged into the whole weights, so the model is loaded
    whole into CPU memory, merged, sharded, then moved."""
    W, experts, attention = config.tensor_parallel_size, config.parallel_experts, config.parallel_attention
    if config.adapter:
        from mixr.train.lora import load_adapter, merge_lora
        model = load_model(model_dir, device="cpu", dtype=dtype, progress=rank == 0)
        merge_lora(load_adapter(model, config.adapter))
        model = shard_model(model, rank, W, experts=experts, attention=attention).to(device)
    else:
        model = load_model(model_dir, device=device, dtype=dtype, progress=rank == 0,
                           shard=(rank, W, experts, attention), load_format=config.load_format)
    model.eval()
    if device.type == "cuda" and config.custom_all_reduce:  # before the graphs capture all-reduces
        comm = model.lm_head.comm
        why = comm.enable_one_shot(device, model.lm_head.weight.dtype)
        ok = torch.tensor([why is None], dtype=torch.int32, device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank takes the same path, or a collective would hang
        if not ok.item():
            comm.one_shot = None
            if rank == 0:
                warnings.warn(f"one-shot all-reduce unavailable, NCCL for every all-reduce: {why or 'another rank'}")
    if config.moe_dynamic:  # before the runner captures its CUDA graphs
        set_dynamic_experts(model, config.moe_dynamic, config.moe_top_p, config.moe_entropy_scale,
                            config.moe_k_min, config.moe_k_max)
    return model


def min_over_ranks(n: int) -> int:
    """The smallest `n` of all ranks: each rank's KV budget, so that every cache holds the same blocks."""
    t = torch.tensor([n], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def make_runner(model: CausalLM, config, max_model_len: int) -> ModelRunner:
    """The same runner on every rank (LLMEngine builds the single-process one itself)."""
    return ModelRunner(model, config.block_size, max_model_len, config.max_num_seqs, config.max_num_batched_tokens,
                       config.gpu_memory_utilization, config.kv_cache_bytes, config.cuda_graphs,
                       kv_cache_dtype=config.kv_cache_dtype, min_over_ranks=min_over_ranks)


class _State:
    """What rank 0's watcher thread shares with Workers (never Workers itself, which must stay collectable)."""

    def __init__(self):
        self.error: str | None = None
        self.failed_rank: int | None = None
        self.failed = threading.Event()
        self.closing = False
        self.replies: queue.SimpleQueue = queue.SimpleQueue()  # (rank, message) from the watcher
        self.group = None  # NCCL: the process group to abort on a failure
        self.graphs: dict | None = None  # rank 0's CUDA graphs, dropped before the group is destroyed
        self.lock = threading.Lock()

    def fail(self, message: str, rank: int) -> None:
        with self.lock:
            if self.error is not None or self.closing:
                return
            self.error, self.failed_rank = message, rank
        self.failed.set()
        if self.group is not None:  # NCCL: a wait on the dead peer would last until the NCCL timeout
            with contextlib.suppress(Exception):
                self.group.abort()


class Workers:
    """Ranks 1..N-1, each a process running `_worker`, and this process joined to their group as rank 0 with its
    own shard (`model`) and ModelRunner (`runner`; the engine steps it through a ParallelRunner). Raises as rank 0's
    own loading does (a ValueError for sizes that do not shard, before any worker starts), or WorkerError when a
    worker fails first. Nothing it holds refers back to it, so dropping the engine stops the workers at once."""

    def __init__(self, model_dir: str | Path, device: str | torch.device | None, dtype, config):
        W = config.tensor_parallel_size
        if dist.is_initialized():
            raise RuntimeError("tensor_parallel_size > 1 needs this process's torch.distributed default group, "
                               "which is already in use (one tensor-parallel engine per process)")
        cuda = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
        if cuda and torch.cuda.device_count() < W:
            raise ValueError(f"tensor_parallel_size={W} needs {W} GPUs; {torch.cuda.device_count()} are visible")
        # a bad checkpoint directory (CheckpointError) or sizes that do not shard fail here, before any worker starts
        with torch.device("meta"):
            meta = parse_config(read_config(model_dir), model_dir).build()
        check_shardable(meta, W, config.parallel_experts, config.parallel_attention)
        self.world_size = W
        self.device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        self._state = state = _State()
        if cuda:
            os.environ.update(NCCL_ENV)  # rank 0's communicator reads them too
            torch.cuda.set_device(self.device)
        store = dist.TCPStore(HOST, 0, W, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
        ctx = mp.get_context("spawn")
        threads = max(1, torch.get_num_threads() // W)  # a CPU's cores shared among the ranks
        self.procs, self._cmds, replies = [], [], []
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self._cmds, state)
        try:
            for rank in range(1, W):
                cmd_out, cmd_in = ctx.Pipe(duplex=False)
                reply_out, reply_in = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_worker, name=f"mixr-rank{rank}", daemon=True,
                                args=(rank, store.port, str(model_dir), cuda, dtype, config, cmd_out, reply_in,
                                      threads))
                p.start()
                cmd_out.close()  # the worker's ends: a closed pipe is how each side sees the other die
                reply_in.close()
                self.procs.append(p)
                self._cmds.append(cmd_in)
                replies.append(reply_out)
            threading.Thread(target=_watch, args=(self.procs, replies, state), name="mixr-tp-watch",
                             daemon=True).start()
            self._collect("started")  # before the rendezvous, which would wait for a worker that never came
            dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=0, world_size=W, timeout=TIMEOUT,
                                    device_id=self.device if cuda else None)
            state.group = dist.group.WORLD if cuda else None
            self.model = load_shard(model_dir, self.device, dtype, config, 0)
            self.runner = make_runner(self.model, config, config.max_model_len or
                                      self.model.config.max_position_embeddings)
            state.graphs = self.runner.graphs
            blocks = {rank: msg[0] for rank, msg in self._collect("ready").items()} | {0: self.runner.num_blocks}
            if len(set(blocks.values())) > 1:
                raise WorkerError(f"the ranks' KV caches differ in size (blocks by rank: {blocks})")
        except BaseException as e:
            self._raise(e)

    @property
    def failed(self) -> threading.Event:
        """Set once any rank has failed."""
        return self._state.failed

    @property
    def error(self) -> str | None:
        """What failed, or None."""
        return self._state.error

    def close(self) -> None:
        """Stop the workers and leave the process group (idempotent)."""
        self._finalizer()

    # -- rank 0's side of a step -------------------------------------------------------------------------------
    def check(self) -> None:
        if self._state.error is not None:
            self.close()
            raise WorkerError(self._state.error)
        if self._state.closing:
            raise WorkerError("the tensor-parallel engine is closed")

    def send(self, message: tuple) -> None:
        """The same message to every worker, pickled once."""
        self.send_each([pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)] * len(self._cmds))

    def send_each(self, messages: list) -> None:
        """messages[r - 1] to worker r: a tuple, or bytes already pickled."""
        self.check()
        try:
            for c, m in zip(self._cmds, messages, strict=True):
                c.send_bytes(m if isinstance(m, bytes) else pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL))
        except BaseException as e:  # BrokenPipeError: a worker is gone
            self._raise(e)

    @contextlib.contextmanager
    def step(self):
        """Around rank 0's part of work that all ranks do together."""
        self.check()
        try:
            yield
        except BaseException as e:
            self._raise(e)
        self.check()

    def _raise(self, cause: BaseException):
        """Rank 0 failed during start-up or a step: the ranks are out of step for good. Raise the worker's failure
        when one caused it (a failed collective, a broken pipe), else `cause` itself."""
        if isinstance(cause, (RuntimeError, OSError, EOFError)) and not isinstance(cause, WorkerError):
            self._state.failed.wait(5)  # a worker most likely died: give the watcher a moment to say how
        self._state.fail(f"tensor-parallel rank 0 failed: {cause!r}", 0)
        self.close()
        if self._state.failed_rank in (0, None) or isinstance(cause, WorkerError):
            raise cause
        raise WorkerError(self._state.error) from cause

    def _collect(self, kind: str) -> dict[int, tuple]:
        """Every worker's next reply, which is `kind`: {rank: its fields}."""
        got: dict[int, tuple] = {}
        deadline = time.monotonic() + TIMEOUT.total_seconds()
        while len(got) < self.world_size - 1:
            self.check()
            try:
                rank, (what, *fields) = self._state.replies.get(timeout=0.1)
            except queue.Empty:
                if time.monotonic() > deadline:
                    self._state.fail(f"no {kind!r} reply from every worker within {TIMEOUT}", 0)
                continue
            if what != kind:
                raise WorkerError(f"worker {rank} replied {what!r}, expected {kind!r}")
            got[rank] = tuple(fields)
        return got

    @torch.no_grad()
    def update_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
        """LLMEngine.update_weights for every rank: `weights` are full tensors under the checkpoint's names; each is
        broadcast from rank 0 and every rank copies its shard of it. All names and shapes are checked first."""
        model, W = self.model, self.world_size
        own = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
        items = [(name, value.detach()) for name, value in (weights.items() if isinstance(weights, Mapping)
                                                             else weights)]
        for name, value in items:
            if name not in own:
                raise ValueError(f"update_weights: the model has no tensor {name!r}")
            try:
                shard_of(name, value.to("meta"), own[name].shape, 0, W)
            except ValueError as e:
                raise ValueError(f"update_weights: {e}") from None
        self.send(("update", [(name, tuple(value.shape), own[name].dtype) for name, value in items]))
        with self.step():
            for name, value in items:
                full = value.to(self.device, own[name].dtype).contiguous()
                dist.broadcast(full, 0)
                own[name].copy_(shard_of(name, full, own[name].shape, 0, W))
            self._collect("updated")
        return len(items)


class ParallelRunner:
    """Rank 0's runner under tensor parallelism: each forward is sent to the workers first, and all ranks run it
    together. Everything else (num_blocks, cache, graphs, ...) is rank 0's ModelRunner's."""

    def __init__(self, workers: Workers):
        self.runner, self.workers = workers.runner, workers

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def fits_decode(self, seqs, counts: list[int]) -> bool:
        return self.runner.fits_decode(seqs, counts)

    def decode(self, seqs, next_ids: torch.Tensor | None = None, counts: list[int] | None = None) -> torch.Tensor:
        if next_ids is not None:  # EngineConfig refuses async scheduling with tensor parallelism
            raise NotImplementedError("tensor-parallel workers are sent host tokens, not a running step's")
        self.workers.send(_decode_message(seqs, counts))
        with self.workers.step():
            return self.runner.decode(seqs, counts=counts)

    def prefill(self, seqs, counts: list[int]) -> torch.Tensor:
        self.workers.send(("prefill", _chunks(seqs, counts), None))
        with self.workers.step():
            return self.runner.prefill(seqs, counts)

    def sample(self, logits: torch.Tensor, reqs):
        with self.workers.step():  # on a GPU, the step's first wait on the collectives
            pending = self.runner.sample(logits, reqs)
            pending.result()
        return pending


class DataParallelRunner(ParallelRunner):
    """Rank 0's runner under data-parallel attention (EngineConfig.parallel_attention="dp"): a step's sequences run
    on the ranks whose KV caches hold them (`Sequence.dp_rank`, set by block_manager.DataParallelBlocks), each rank
    sent its own rows. Every rank runs every forward, a rank with nothing to do on padding rows, since the routed
    experts' dispatch and the LM head are collectives; the LM head leaves every rank's rows, each rank's padded to
    the largest count, in rank 0's logits, from which the batch's are picked."""

    def _parts(self, seqs) -> list[list[int]]:
        parts: list[list[int]] = [[] for _ in range(self.workers.world_size)]
        for i, s in enumerate(seqs):
            parts[s.dp_rank].append(i)
        return parts

    def fits_decode(self, seqs, counts: list[int]) -> bool:
        return all(self.runner.fits_decode([seqs[i] for i in p], [counts[i] for i in p])
                   for p in self._parts(seqs) if p)

    def decode(self, seqs, next_ids: torch.Tensor | None = None, counts: list[int] | None = None) -> torch.Tensor:
        if next_ids is not None:
            raise NotImplementedError("data-parallel workers are sent host tokens, not a running step's")
        parts = self._parts(seqs)
        sizes = [[1 if counts is None else counts[i] for i in p] for p in parts]
        rows = max(sum(n) for n in sizes)
        self.workers.send_each([_decode_message([seqs[i] for i in p], None if counts is None else n, rows)
                                for p, n in zip(parts[1:], sizes[1:])])
        with self.workers.step():
            out = self.runner.decode([seqs[i] for i in parts[0]], counts=None if counts is None else sizes[0],
                                     rows=rows)
        return out[self._pick(parts, sizes, out.shape[0] // len(parts))]

    def prefill(self, seqs, counts: list[int]) -> torch.Tensor:
        parts = self._parts(seqs)
        rows = max(map(len, parts))
        self.workers.send_each([("prefill", _chunks([seqs[i] for i in p], [counts[i] for i in p]), rows)
                                for p in parts[1:]])
        with self.workers.step():
            out = self.runner.prefill([seqs[i] for i in parts[0]], [counts[i] for i in parts[0]], rows=rows)
        return out[self._pick(parts, [[1] * len(p) for p in parts], rows)]

    def _pick(self, parts: list[list[int]], sizes: list[list[int]], per_rank: int) -> torch.Tensor:
        """The row of each sequence's last token in the gathered logits, in the batch's order."""
        at = [0] * sum(map(len, parts))
        for r, (p, n) in enumerate(zip(parts, sizes)):
            end = r * per_rank
            for i, k in zip(p, n):
                end += k
                at[i] = end - 1
        return torch.tensor(at, device=self.runner.device)


def _decode_message(seqs, counts: list[int] | None, pad: int | None = None) -> tuple:
    """A decode step for the workers: one row per sequence at its last token, or counts[i] rows each."""
    if counts is None:
        return ("decode", [(s.token_ids[-1], s.num_tokens, s.block_table) for s in seqs], pad)
    return ("rows", _chunks(seqs, counts), pad)


def _chunks(seqs, counts: list[int]) -> list[tuple]:
    """(the tokens fed, their first position, block table) of each sequence."""
    return [(s.token_ids[s.num_computed_tokens:s.num_computed_tokens + n], s.num_computed_tokens, s.block_table)
            for s, n in zip(seqs, counts)]


class _Seq:
    """The fields of a Sequence that ModelRunner reads, rebuilt in a worker from a step message."""

    __slots__ = ("block_table", "num_computed_tokens", "num_tokens", "token_ids")

    def __init__(self, token_ids: list[int], num_tokens: int, block_table: list[int], num_computed_tokens: int = 0):
        self.token_ids, self.num_tokens, self.block_table = token_ids, num_tokens, block_table
        self.num_computed_tokens = num_computed_tokens


def _worker(rank: int, port: int, model_dir: str, cuda: bool, dtype, config, cmds, replies, threads: int) -> None:
    """Rank `rank` >= 1: join the group, load its shard, build its runner, then run the forwards rank 0 sends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle; the workers end with it
    tqdm.set_lock(threading.RLock())  # tqdm's default lock is a named semaphore, which os._exit below would leak
    code = 1
    try:
        W = config.tensor_parallel_size
        if cuda:
            os.environ.update(NCCL_ENV)
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(threads)
        replies.send(("started",))
        store = dist.TCPStore(HOST, port, W, is_master=False, timeout=TIMEOUT)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=W, timeout=TIMEOUT,
                                device_id=device if cuda else None)
        model = load_shard(model_dir, device, dtype, config, rank)
        runner = make_runner(model, config, config.max_model_len or model.config.max_position_embeddings)
        replies.send(("ready", runner.num_blocks))
        while True:
            try:
                kind, *args = pickle.loads(cmds.recv_bytes())
            except EOFError:  # rank 0 is gone
                break
            if kind == "decode":  # args: rows, the row count to pad to (data-parallel attention) or None
                runner.decode([_Seq([last], n, table) for last, n, table in args[0]], rows=args[1])
            elif kind in ("rows", "prefill"):
                # ids before a chunk are never read (their KV is in the cache): zeros keep the runner's indexing
                chunks = args[0]
                seqs = [_Seq([0] * start + ids, start + len(ids), table, start) for ids, start, table in chunks]
                counts = [len(ids) for ids, _, _ in chunks]
                if kind == "rows":
                    runner.decode(seqs, counts=counts, rows=args[1])
                else:
                    runner.prefill(seqs, counts, rows=args[1])
            elif kind == "update":
                _receive_weights(model, args[0], rank, W, device)
                replies.send(("updated",))
            elif kind == "stop":
                code = 0
                break
            else:
                raise ValueError(f"unknown command {kind!r}")
    except BaseException:
        with contextlib.suppress(OSError):
            replies.send(("error", traceback.format_exc()))
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: this CPU build of torch can abort at interpreter exit after a process group (tests/test_parallel.py)
    os._exit(code)


@torch.no_grad()
def _receive_weights(model: CausalLM, specs: list[tuple], rank: int, world_size: int, device) -> None:
    own = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    for name, shape, dtype in specs:
        full = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(full, 0)
        if (dst := own.get(name)) is not None:  # else a row-parallel layer's bias, which rank 0 alone adds
            dst.copy_(shard_of(name, full, dst.shape, rank, world_size))


def _watch(procs: list, replies: list, state: _State) -> None:
    """Rank 0's watcher thread: hand the workers' replies to Workers and record the first failure."""
    pipes = {c: rank for rank, c in enumerate(replies, 1)}
    alive = {p.sentinel: (rank, p) for rank, p in enumerate(procs, 1)}

    def read(conn) -> None:
        rank = pipes[conn]
        try:
            message = conn.recv()
        except (EOFError, OSError):
            del pipes[conn]
            conn.close()
            return
        if message[0] == "error":
            state.fail(f"tensor-parallel worker {rank} failed:\n{message[1]}", rank)
        else:
            state.replies.put((rank, message))

    while alive:
        ready = connection.wait([*pipes, *alive])
        for obj in sorted(ready, key=lambda o: o not in pipes):  # a worker's last words before its exit
            if obj in pipes:
                read(obj)
            elif obj in alive:
                rank, p = alive.pop(obj)
                conn = next((c for c, r in pipes.items() if r == rank), None)
                while conn in pipes and conn.poll():
                    read(conn)
                p.join()
                code = p.exitcode  # None when _shutdown's join reaped it first
                how = f"was killed by {signal.Signals(-code).name}" if (code or 0) < 0 else f"exited with code {code}"
                state.fail(f"tensor-parallel worker {rank} (pid {p.pid}) {how}", rank)


def _shutdown(procs: list, cmds: list, state: _State) -> None:
    """Stop the workers and leave the process group: Workers.close, garbage collection, or interpreter exit."""
    state.closing = True
    stop = pickle.dumps(("stop",))
    for c in cmds:
        with contextlib.suppress(OSError):
            c.send_bytes(stop)
        c.close()
    if state.graphs:
        # a CUDA graph holding NCCL kernels makes destroy_process_group hang in ncclCommDestroy (pytorch#115388)
        state.graphs.clear()
        if state.error is None:  # after a failure, a kernel may still wait on a dead peer
            torch.cuda.synchronize()
    if dist.is_initialized():
        with contextlib.suppress(Exception):  # a worker blocked in a collective with rank 0 now fails and exits
            dist.destroy_process_group()
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
