"""The tensor-parallel engine (mixr.engine.distributed): LLM(tensor_parallel_size=2) on 2 CPU processes over gloo
against the single-process engine, update_weights, abort, close, and a failed worker (an error, never a hang)."""

import contextlib
import multiprocessing
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from conftest import FAMILIES, make_hf_checkpoint, start_mixr_serve

from mixr import LLM, SamplingParams, load_model
from mixr.engine.distributed import WorkerError
from mixr.tokenizer import Tokenizer
from mixr.parallel import shard_model, shard_of

PREFIX = list(range(30, 62))  # two full blocks: the second call's prompts find them in the prefix cache
PROMPTS = [[5, 7, 9, 11], [100, 3, 44, 12, 99, 18, 7], PREFIX + [1, 2, 3], list(range(200, 250))]
AGAIN = [PREFIX + [4, 5, 6, 7, 8], [9, 8, 7]]
# max_num_batched_tokens 32: the 50-token prompt is prefilled in chunks, alongside decodes
CONFIG = dict(device="cpu", dtype="float32", max_num_seqs=8, max_num_batched_tokens=32)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(autouse=True)
def one_thread():
    """Rank 0 (this process) and the worker share the CI machine's 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def generate(llm: LLM) -> list[list[int]]:
    out = llm.generate(PROMPTS, GREEDY)
    again = llm.generate(AGAIN, GREEDY)
    assert again[0].metrics.num_cached_tokens == len(PREFIX)
    return [o.token_ids for o in out + again]


def assert_no_workers() -> None:
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("mixr-rank")]


@pytest.mark.parametrize("name", ["deepseek_v2_greedy", "deepseek_v3_noaux_tc", "qwen2_moe", "qwen3_moe", "mixtral"])
def test_tp_and_ep_engines_match_one_process(name, checkpoint):
    path = checkpoint(name)
    single = LLM(path, **CONFIG)
    assert single.engine.workers is None and not torch.distributed.is_initialized()  # TP=1: no processes, no group
    assert_no_workers()
    expected = generate(single)
    for experts, attention in (("tp", "tp"), ("ep", "tp"), ("ep", "dp")):
        with LLM(path, tensor_parallel_size=2, parallel_experts=experts, parallel_attention=attention,
                 **CONFIG) as llm:
            assert llm.engine.runner.num_blocks == single.engine.runner.num_blocks
            assert llm.model.parallel == (0, 2, experts, attention)
            assert generate(llm) == expected, (experts, attention)
            if attention == "dp":  # both ranks' caches held sequences (their prefixes stay cached)
                assert all(pool.hash_to_block for pool in llm.engine.scheduler.block_manager.pools)
        assert_no_workers()


def test_prompt_chunks_as_decode_rows(checkpoint):
    """Short prompt chunks that run as decode rows (on a GPU: in the captured graphs, ModelRunner.fits_decode) reach
    the workers as such, under TP and under data-parallel attention, where each rank's rows are padded to the
    largest rank's. On a CPU there are no graphs, so rank 0's runner is told every step fits."""
    path = checkpoint("deepseek_v2_greedy")
    expected = generate(LLM(path, **CONFIG))
    for experts, attention in (("tp", "tp"), ("ep", "dp")):
        with LLM(path, tensor_parallel_size=2, parallel_experts=experts, parallel_attention=attention,
                 **CONFIG) as llm:
            calls = []
            llm.engine.runner.runner.fits_decode = lambda seqs, counts: calls.append(counts) or True
            assert generate(llm) == expected, attention
            assert any(max(c) > 1 for c in calls)
        assert_no_workers()


def test_fewer_kv_heads_than_ranks_are_replicated(checkpoint):
    """Qwen3 with one KV head (as Qwen3-235B has 4 for 8 GPUs): each rank keeps the head, and TP=2 gives TP=1's
    tokens."""
    path = checkpoint("qwen3")
    expected = generate(LLM(path, **CONFIG))
    with LLM(path, tensor_parallel_size=2, **CONFIG) as llm:
        attn = llm.model.model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads, llm.model.config.num_key_value_heads) == (2, 1, 1)
        assert generate(llm) == expected
    assert_no_workers()


@pytest.mark.parametrize("name", ["deepseek_v3_noaux_tc", "qwen2_moe", "mixtral", "qwen2_tied", "qwen3"])
def test_sharded_load_cuts_what_shard_model_cuts(name, checkpoint):
    """Each rank's load (load_model's shard=, which reads only its part of each tensor) and update_weights' slicing
    of a full tensor (shard_of), against shard_model's shards of the whole model (no process group needed)."""
    path = checkpoint(name)
    full = load_model(path, dtype=torch.float32, progress=False).state_dict()
    for experts in ("tp", "ep"):
        for rank in (0, 1):
            model = shard_model(load_model(path, dtype=torch.float32, progress=False), rank, 2, experts=experts)
            loaded = load_model(path, dtype=torch.float32, progress=False, shard=(rank, 2, experts))
            assert loaded.parallel == (rank, 2, experts, "tp") and loaded.config == model.config
            state = loaded.state_dict()
            assert state.keys() == model.state_dict().keys()  # rank 1 has no row-parallel biases
            for key, shard in model.state_dict().items():
                assert torch.equal(state[key], shard), (experts, rank, key)
                assert torch.equal(shard_of(key, full[key], shard.shape, rank, 2), shard), (experts, rank, key)
            if model.config.tie_word_embeddings:
                assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with pytest.raises(ValueError, match="not the whole of this rank's shard"):
        shard_of("lm_head.weight", torch.zeros(7, 64), torch.Size([256, 64]), 0, 2)


def test_dummy_weights_are_one_model_at_every_world_size(checkpoint):
    """load_format="dummy": no safetensors read; each rank's shard is shard_model's cut of the whole dummy model,
    so TP=2 and EP=2 engines give TP=1's greedy tokens."""
    path = checkpoint("deepseek_v3_noaux_tc")
    whole = load_model(path, dtype=torch.float32, progress=False, load_format="dummy")
    state = whole.state_dict()
    again = load_model(path, dtype=torch.float32, progress=False, load_format="dummy").state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)  # seeded by name: the same model every time
    real = load_model(path, dtype=torch.float32, progress=False).state_dict()
    assert state.keys() == real.keys() and all(state[k].shape == real[k].shape for k in state)
    assert torch.equal(state["model.norm.weight"], torch.ones_like(state["model.norm.weight"]))
    w = state["model.layers.1.mlp.experts.gate_up_proj"]
    assert abs(w.std().item() - 0.02) < 0.002 and not torch.equal(w[0], w[1])
    for rank in (0, 1):
        model = shard_model(load_model(path, dtype=torch.float32, progress=False, load_format="dummy"), rank, 2, "tp")
        loaded = load_model(path, dtype=torch.float32, progress=False, shard=(rank, 2, "tp"), load_format="dummy")
        for key, shard in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], shard), (rank, key)
    expected = generate(LLM(path, load_format="dummy", **CONFIG))
    real = generate(LLM(path, **CONFIG))
    assert expected != real
    for experts, attention in (("tp", "tp"), ("ep", "tp"), ("ep", "dp")):
        with LLM(path, tensor_parallel_size=2, parallel_experts=experts, parallel_attention=attention,
                 load_format="dummy", **CONFIG) as llm:
            assert generate(llm) == expected, experts
            if attention == "dp":  # and the real weights sent over (as an RL trainer does): the real tokens
                llm.update_weights(load_model(path, dtype=torch.float32, progress=False).state_dict())
                assert generate(llm) == real
    with pytest.raises(ValueError, match="unsupported load_format 'npz'"):
        load_model(path, load_format="npz")


def test_data_parallel_attention_refuses_what_it_cannot_run(checkpoint):
    with pytest.raises(ValueError, match="parallel_attention='dp' splits the routed experts by expert"):
        LLM(checkpoint("mixtral"), tensor_parallel_size=2, parallel_attention="dp", **CONFIG)
    with pytest.raises(ValueError, match="parallel_attention must be 'tp' or 'dp'"):
        LLM(checkpoint("mixtral"), tensor_parallel_size=2, parallel_attention="sp", **CONFIG)
    with pytest.raises(ValueError, match="data-parallel attention needs a MoE model"):
        LLM(checkpoint("qwen2_tied"), tensor_parallel_size=2, parallel_experts="ep", parallel_attention="dp",
            **CONFIG)
    assert_no_workers()


def test_update_weights_abort_and_close(checkpoint, tmp_path):
    name = "deepseek_v3_noaux_tc"
    other = make_hf_checkpoint(tmp_path / "other", *FAMILIES[name], seed=1)
    expected = generate(LLM(other, **CONFIG))
    llm = LLM(checkpoint(name), tensor_parallel_size=2, **CONFIG)
    procs = llm.engine.workers.procs
    stream = llm.stream([1, 2, 3], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()  # aborts the request: its blocks are free, the workers never knew it
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="no tensor 'nope'"):
        llm.update_weights({"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="lm_head.weight has shape"):  # checked before anything is sent
        llm.update_weights({"lm_head.weight": torch.zeros(3, 64)})
    weights = load_model(other, dtype=torch.float32, progress=False).state_dict()
    assert llm.update_weights(weights) == len(weights)
    assert generate(llm) == expected
    llm.close()
    assert not any(p.is_alive() for p in procs)
    assert_no_workers()
    with pytest.raises(WorkerError, match="closed"):
        llm.generate([[1, 2, 3]], GREEDY)


def test_worker_exception_is_an_error_in_rank_0(checkpoint):
    llm = LLM(checkpoint("mixtral"), tensor_parallel_size=2, **CONFIG)
    llm.engine.workers.send(("no such command",))  # the worker raises ValueError and exits
    t = time.monotonic()
    with pytest.raises(RuntimeError, match=r"worker 1 failed:\n(.|\n)*ValueError: unknown command") as e:
        llm.generate(PROMPTS, GREEDY)
    assert time.monotonic() - t < 10 and isinstance(e.value, WorkerError)
    with pytest.raises(WorkerError, match="worker 1 failed"):  # and at every call after
        llm.generate(PROMPTS, GREEDY)
    assert not any(p.is_alive() for p in llm.engine.workers.procs)
    assert_no_workers()


def workers_of(pid: int) -> list[int]:
    """The spawned children of process `pid` (not multiprocessing's resource tracker)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
            if int(fields[1]) == pid and b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                out.append(int(stat.parent.name))
    return out


@pytest.mark.parametrize("attention", ["tp", "dp"])
def test_mixr_serve_tensor_parallel_exits_when_a_worker_dies(attention, checkpoint, tmp_path):
    path = checkpoint("deepseek_v2_greedy")
    expected = [o.token_ids for o in LLM(path, **CONFIG).generate(PROMPTS, GREEDY)]
    proc, base, log = start_mixr_serve(
        [str(path), "--device", "cpu", "--dtype", "float32", "--max-num-seqs", "8", "--served-model-name", "m",
         "--tensor-parallel-size", "2", "--parallel-experts", "ep", "--parallel-attention", attention],
        tmp_path / "server.log", env={"OMP_NUM_THREADS": "1"})
    try:
        def complete(prompt):
            return httpx.post(f"{base}/v1/completions", json={
                "model": "m", "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True},
                timeout=60).json()

        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # at once: under DP both ranks hold sequences
            got = list(pool.map(complete, PROMPTS))
        assert [r["usage"]["completion_tokens"] for r in got] == [10] * len(PROMPTS)
        # the server detokenizes; compare the text of the single-process engine's tokens
        tok = Tokenizer.from_dir(path)
        assert [r["choices"][0]["text"] for r in got] == [tok.decode(t) for t in expected]
        (worker,) = workers_of(proc.pid)
        os.kill(worker, signal.SIGKILL)
        assert proc.wait(30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    text = log.read()
    assert f"mixr: error: tensor-parallel worker 1 (pid {worker}) was killed by SIGKILL" in text, text
    assert "Traceback" not in text, text


def _one_shot_rank(rank: int, port: int) -> None:
    from datetime import timedelta

    from mixr.engine.distributed import NCCL_ENV
    from mixr.parallel import Comm
    os.environ.update(NCCL_ENV)
    torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                         timeout=timedelta(seconds=120), device_id=torch.device("cuda", rank))
    comm = Comm(rank, 2)
    assert comm.enable_one_shot(torch.device("cuda", rank), torch.bfloat16) is None
    for rows, hidden in ((1, 64), (8, 2048), (600, 2048)):  # the last is past the 1 MiB buffer: NCCL
        parts = [torch.randn(rows, hidden, generator=torch.Generator().manual_seed(10 * r + rows)) for r in (0, 1)]
        expected = (parts[0] + parts[1]).to(torch.bfloat16).float()
        x = parts[rank].to("cuda", torch.bfloat16)
        got = comm.all_reduce(x.clone())
        torch.testing.assert_close(got.float().cpu(), expected, rtol=1e-2, atol=1e-2)
        static = x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = comm.all_reduce(static)
        static.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, got), (rows, hidden)
        del graph
    torch.cuda.synchronize()
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_one_shot_all_reduce_on_two_gpus():
    """The symmetric-memory all-reduce (eager and inside a CUDA graph) against the sum on the host; a tensor past
    its buffer goes through NCCL."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_one_shot_rank, args=(port,), nprocs=2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp_engine_on_two_gpus(checkpoint):
    """bf16 on 2 GPUs with CUDA graphs: the one-shot all-reduce gives NCCL's greedy tokens, and both start as the
    1-GPU engine does."""
    path = checkpoint("deepseek_v3_noaux_tc")
    config = dict(device="cuda", dtype="bfloat16", max_num_seqs=8, max_model_len=256)
    with LLM(path, **config) as llm:
        single = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    runs = {}
    for one_shot in (True, False):
        with LLM(path, tensor_parallel_size=2, custom_all_reduce=one_shot, **config) as llm:
            assert llm.engine.runner.graphs and (llm.model.lm_head.comm.one_shot is not None) == one_shot
            runs[one_shot] = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        assert_no_workers()
    assert runs[False] == runs[True]
    assert [t[0] for t in runs[False]] == [t[0] for t in single]
    # data-parallel attention: all-to-all dispatch in the eager prefill, all-gather inside the decode graphs
    with LLM(path, tensor_parallel_size=2, parallel_experts="ep", parallel_attention="dp", **config) as llm:
        assert llm.engine.runner.graphs
        dp = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert_no_workers()
    assert [t[0] for t in dp] == [t[0] for t in single]
