"""GRPO (DeepSeekMath, DeepSeek-R1) on the reasoning task suite, with the engine doing the rollouts.

`train_grpo(config)` is one flat loop, read top to bottom. Per step:
  1. rollout: prompts_per_step train-split problems, group_size samples each, from the engine's `LLM`, which holds
     its own copy of the weights in the serving dtype (bf16 on a GPU: CUDA graphs, Triton kernels);
  2. reward: the task verifiers (correct + FORMAT_WEIGHT * format), group-normalised advantages;
  3. loss: the clipped token-level policy loss on the float32 policy (bf16 autocast on a GPU), with old-policy
     log-probs recomputed before the update (ratio 1 on the first pass; clipping bites from the second of
     ppo_epochs) and a k3 KL to the frozen starting model when beta > 0;
  4. step: clip, AdamW, then `LLM.update_weights` copies the new weights into the engine in place;
  5. log (JSONL, tqdm), held-out evaluation every eval_every steps, checkpoint; curve.svg at the end.

The math lives in free functions (mixr.train.losses: group_advantages, policy_loss) tested on hand-built tensors.
"""

import copy
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mixr.checkpoint import load_model
from mixr.llm import LLM
from mixr.models.base import CausalLM
from mixr.sampling import SamplingParams
from mixr.tokenizer import Tokenizer
from mixr.train.config import GRPOConfig
from mixr.train.losses import entropy, group_advantages, policy_loss, token_logprobs
from mixr.train.plot import plot_log
from mixr.train.sft import batch_indices, collate, lr_at, save_checkpoint
from mixr.train.tasks import TASKS, Item, RewardResult, generate


# ---------------------------------------------------------------- prompts, rollouts, rewards

def prompt_pool(tasks: dict[str, float], num_prompts: int, seed: int, split: str = "train") -> list[Item]:
    """num_prompts problems of `split`, shared among the tasks by weight, in a seeded shuffled order.

    Drawn with repeats allowed, so the pool follows each task's own distribution (the one held-out problems come
    from): distinct problems would under-represent small problem spaces, e.g. one-digit arithmetic."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {sorted(TASKS)}")
    total = sum(tasks.values())
    items = []
    for name, weight in tasks.items():
        # a seed space of its own, so GRPO's prompts are not the first items SFT trained on with the same seed
        items += generate(TASKS[name], round(num_prompts * weight / total), seed=f"grpo:{seed}", split=split,
                          unique=False)
    random.Random(seed).shuffle(items)
    return items


def prompt_ids(tokenizer: Tokenizer, item: Item) -> list[int]:
    """The user turn rendered with the chat template and its generation prompt (R1's opens `<think>`)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": item.prompt}], add_generation_prompt=True,
                                         tokenize=True)


def score(item: Item, text: str) -> RewardResult:
    return TASKS[item.task].reward(text, item.answer)


@dataclass
class Rollout:
    """G samples for each of N prompts, groups contiguous: sample i answers prompt i // G."""
    items: list[Item]
    prompts: list[list[int]]          # N token-id lists
    completions: list[list[int]]      # N*G, eos included when the sample stopped on it
    texts: list[str]
    finish_reasons: list[str]
    results: list[RewardResult]

    @property
    def rewards(self) -> torch.Tensor:
        return torch.tensor([r.total for r in self.results], dtype=torch.float32)


def rollout(llm: LLM, items: list[Item], params: list[SamplingParams],
            reward_fn: Callable[[Item, str], RewardResult] = score) -> Rollout:
    """Sample params[i].n completions of each item's prompt and score them with reward_fn (the task's verifier)."""
    prompts = [prompt_ids(llm.tokenizer, it) for it in items]
    outs = llm.generate(prompts, params)
    completions, texts, reasons, results = [], [], [], []
    for it, out in zip(items, outs):
        for o in out.outputs:
            completions.append(o.token_ids)
            texts.append(o.text)
            reasons.append(o.finish_reason)
            results.append(reward_fn(it, o.text))
    return Rollout(items, prompts, completions, texts, reasons, results)


def evaluate(llm: LLM, tasks: list[str], num_examples: int, seed: int = 0, max_tokens: int = 256,
             samples: int = 1, temperature: float = 0.0, details: bool = False) -> dict[str, dict]:
    """Held-out scores per task on the first num_examples test-split problems of `seed`: greedy by default.

    Per task: accuracy (mean over samples of correct == 1), format (mean format reward), length (mean completion
    tokens), truncated (share that hit max_tokens) and, with samples > 1, pass@samples (any sample correct);
    details=True adds "correct", the 0/1 score of every sample (for paired comparisons of two models).
    "mean" averages the tasks' accuracies.
    """
    sets = {name: generate(TASKS[name], num_examples, seed=seed, split="test") for name in tasks}
    params = SamplingParams(n=samples, temperature=temperature, max_tokens=max_tokens,
                            seed=None if temperature == 0 else seed)
    items = [it for name in tasks for it in sets[name]]
    r = rollout(llm, items, [params] * len(items))  # every task in one batch: the engine runs them together
    out: dict[str, dict[str, float]] = {}
    start = 0
    for name in tasks:
        rows = slice(start * samples, (start + len(sets[name])) * samples)
        start += len(sets[name])
        results, completions = r.results[rows], r.completions[rows]
        correct = [float(x.correct == 1.0) for x in results]
        scores = {"accuracy": statistics.fmean(correct),
                  "format": statistics.fmean(x.format for x in results),
                  "length": statistics.fmean(len(c) for c in completions),
                  "truncated": statistics.fmean(f == "length" for f in r.finish_reasons[rows])}
        if samples > 1:
            scores[f"pass@{samples}"] = statistics.fmean(
                max(correct[i * samples:(i + 1) * samples]) for i in range(len(sets[name])))
        if details:
            scores["correct"] = [int(c) for c in correct]
        out[name] = scores
    out["mean"] = {"accuracy": statistics.fmean(out[n]["accuracy"] for n in tasks)}
    return out


# ---------------------------------------------------------------- the policy's log-probs

def sequences(prompts: list[list[int]], completions: list[list[int]], group_size: int, rows: list[int],
              pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample rows -> ids (B, L) right-padded, and mask (B, L-1): 1 where position t predicts a completion token."""
    examples = []
    for i in rows:
        p, c = prompts[i // group_size], completions[i]
        examples.append((p + c, [0] * len(p) + [1] * len(c)))
    ids, mask, _ = collate(examples, pad_id)
    return ids, mask[:, 1:]


def policy_logprobs(model: CausalLM, ids: torch.Tensor, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token t+1 | ..t) (B, L-1) float32 (differentiable when grad is on), and the entropy (B, L-1), detached."""
    with autocast:
        logits = model(ids)[:, :-1]  # (B, L-1, V)
    logp = token_logprobs(logits, ids[:, 1:])
    with torch.no_grad():
        ent = entropy(logits)
    return logp, ent


@torch.no_grad()
def frozen_logprobs(model: CausalLM, prompts, completions, group_size, rows, pad_id, micro: int, device,
                    autocast) -> dict[int, torch.Tensor]:
    """Per sample row: its completion tokens' log-probs (n_i,) under `model`, without gradients."""
    out = {}
    for k in range(0, len(rows), micro):
        chunk = rows[k:k + micro]
        ids, mask = sequences(prompts, completions, group_size, chunk, pad_id)
        logp, _ = policy_logprobs(model, ids.to(device), autocast)
        for b, i in enumerate(chunk):
            out[i] = logp[b][mask[b].to(device).bool()]
    return out


def micro_batch_weight(aggregation: str, micro_tokens: int, micro_rows: int, tokens: int, rows: int) -> float:
    """What a micro-batch's policy_loss is multiplied by so that the weighted sum over the micro-batches equals
    the loss of the whole minibatch: token-mean averages over its tokens; seq-mean and dr-grpo over sequences."""
    return micro_tokens / tokens if aggregation == "token-mean" else micro_rows / rows


def _gather(per_row: dict[int, torch.Tensor], rows: list[int], mask: torch.Tensor) -> torch.Tensor:
    """Scatter each row's completion values back into a (B, L-1) tensor laid out like mask."""
    out = torch.zeros(mask.shape, device=mask.device)
    for b, i in enumerate(rows):
        out[b][mask[b].bool()] = per_row[i]
    return out


# ---------------------------------------------------------------- the loop

def _sampling_params(cfg: GRPOConfig, step: int, n_prompts: int) -> list[SamplingParams]:
    # A seed per prompt (sample j of it uses seed + j): rollouts are reproducible and a resumed run sees the
    # same samples as an uninterrupted one (on the same device).
    rng = random.Random(f"rollout:{cfg.seed}:{step}")
    return [SamplingParams(n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                           seed=rng.getrandbits(48)) for _ in range(n_prompts)]


def _weighted(pairs: list[tuple[float, float]]) -> float | None:
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def train_grpo(cfg: GRPOConfig, reward_fn: Callable[[Item, str], RewardResult] = score) -> CausalLM:
    """Run GRPO as configured; checkpoints, log.jsonl and curve.svg go to cfg.out_dir. Returns the policy.
    log.jsonl: one record per step (see the README), held-out accuracy as eval/<task> every eval_every steps.
    reward_fn(item, completion text) replaces the task verifiers (held-out evaluation still uses them)."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    start_time = time.perf_counter()

    # policy (float32 master weights), optional frozen reference, tokenizer
    source = Path(cfg.resume_from or cfg.model)
    tokenizer = Tokenizer.from_dir(source)
    policy = load_model(source, device=device, dtype=torch.float32, progress=False)
    ref = None
    if cfg.beta > 0:
        ref = load_model(cfg.model, device=device, dtype=torch.float32, progress=False).eval().requires_grad_(False)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    decay = [p for p in policy.parameters() if p.dim() >= 2]
    no_decay = [p for p in policy.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    step = 0
    if cfg.resume_from:
        state = torch.load(source / "trainer_state.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]

    # the engine: its own copy of the weights, in the serving dtype
    serve_dtype = cfg.serve_dtype or ("bfloat16" if device.type == "cuda" else "float32")
    llm = LLM(copy.deepcopy(policy), tokenizer=tokenizer, device=device, dtype=serve_dtype,
              max_num_seqs=cfg.max_num_seqs, kv_cache_bytes=cfg.kv_cache_bytes,
              gpu_memory_utilization=cfg.gpu_memory_utilization, cuda_graphs=cfg.cuda_graphs)
    pool = prompt_pool(cfg.tasks, cfg.num_prompts, cfg.seed)
    G = cfg.group_size
    log_path = out_dir / "log.jsonl"

    def log(record: dict) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def held_out(at: int) -> dict:
        scores = evaluate(llm, list(cfg.tasks), cfg.eval_examples, max_tokens=cfg.max_tokens)
        return {"step": at, **{f"eval/{name}": s["accuracy"] for name, s in scores.items()}}

    if cfg.eval_every and step == 0:
        log(held_out(0))

    bar = tqdm(total=cfg.steps, initial=step, desc="grpo", disable=not cfg.progress)
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # 1. rollout and 2. reward
        items = [pool[i] for i in batch_indices(len(pool), cfg.prompts_per_step, cfg.seed, step)]
        ro = rollout(llm, items, _sampling_params(cfg, step, len(items)), reward_fn)
        t_rollout = time.perf_counter() - t0
        rewards = ro.rewards
        advantages = group_advantages(rewards, G, scale=cfg.scale_rewards)
        grouped = rewards.view(-1, G)
        zero_var = (grouped == grouped[:, :1]).all(-1)  # (N,) groups with nothing to compare
        groups = [g for g in range(len(items)) if not (cfg.drop_zero_variance and zero_var[g])]

        # 3. loss over minibatches of whole groups; old (and reference) log-probs fixed before any update
        rows_of = {g: list(range(g * G, (g + 1) * G)) for g in groups}
        all_rows = [i for g in groups for i in rows_of[g]]
        # with one update per batch the ratio is exactly 1: old = logp.detach() in the same forward
        recompute_old = bool(groups) and (cfg.ppo_epochs > 1 or cfg.num_minibatches > 1)
        old = frozen_logprobs(policy, ro.prompts, ro.completions, G, all_rows, pad_id, cfg.micro_batch_size,
                              device, autocast) if recompute_old else None
        ref_lp = frozen_logprobs(ref, ro.prompts, ro.completions, G, all_rows, pad_id, cfg.micro_batch_size,
                                 device, autocast) if ref is not None and groups else None
        stats: dict[str, list[tuple[float, float]]] = {}
        losses, grad_norms = [], []
        policy.train()
        for epoch in range(cfg.ppo_epochs if groups else 0):
            order = random.Random(f"minibatch:{cfg.seed}:{step}:{epoch}").sample(groups, len(groups))
            per_mb = -(-len(order) // cfg.num_minibatches)
            for m in range(0, len(order), per_mb):
                rows = [i for g in order[m:m + per_mb] for i in rows_of[g]]
                # micro-batches of similar lengths (less padding); weights make the sum equal the minibatch's loss
                rows.sort(key=lambda i: len(ro.prompts[i // G]) + len(ro.completions[i]))
                n_tokens = sum(len(ro.completions[i]) for i in rows)
                total = 0.0
                for k in range(0, len(rows), cfg.micro_batch_size):
                    chunk = rows[k:k + cfg.micro_batch_size]
                    ids, mask = sequences(ro.prompts, ro.completions, G, chunk, pad_id)
                    ids, mask = ids.to(device), mask.to(device)
                    logp, ent = policy_logprobs(policy, ids, autocast)
                    old_logp = logp.detach() if old is None else _gather(old, chunk, mask)
                    ref_logp = None if ref_lp is None else _gather(ref_lp, chunk, mask)
                    loss, st = policy_loss(logp, old_logp, ref_logp, advantages[chunk].to(device), mask,
                                           clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high, beta=cfg.beta,
                                           aggregation=cfg.aggregation, max_len=cfg.max_tokens)
                    n_micro = mask.sum().item()
                    weight = micro_batch_weight(cfg.aggregation, n_micro, len(chunk), n_tokens, len(rows))
                    (loss * weight).backward()
                    total += loss.item() * weight
                    for key, v in st.items():
                        stats.setdefault(key, []).append((v.item(), n_micro))
                    stats.setdefault("entropy", []).append(((ent * mask).sum().item() / max(n_micro, 1), n_micro))
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip if cfg.grad_clip > 0
                                                           else float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(total)
                grad_norms.append(grad_norm.item())
        # 4. the engine gets the new weights (nothing changed when every group was dropped)
        if groups:
            llm.update_weights(policy.state_dict())
        step += 1

        # 5. log, evaluate, checkpoint
        dt = time.perf_counter() - t0
        correct = [float(r.correct == 1.0) for r in ro.results]
        task_of = [it.task for it in items for _ in range(G)]
        record = {"step": step, "lr": lr,
                  "reward": rewards.mean().item(),
                  "format_reward": statistics.fmean(r.format for r in ro.results),
                  "accuracy": statistics.fmean(correct),
                  **{f"accuracy/{name}": statistics.fmean(c for c, t in zip(correct, task_of) if t == name)
                     for name in cfg.tasks if name in task_of},
                  "zero_variance_frac": zero_var.float().mean().item(),
                  "solved_group_frac": statistics.fmean(max(correct[g * G:(g + 1) * G]) for g in range(len(items))),
                  "response_length": statistics.fmean(len(c) for c in ro.completions),
                  "truncated_frac": statistics.fmean(f == "length" for f in ro.finish_reasons),
                  "entropy": _weighted(stats.get("entropy", [])),
                  "kl": _weighted(stats.get("kl", [])),
                  "clip_frac": _weighted(stats.get("clip_frac", [])),
                  "ratio_mean": _weighted(stats.get("ratio_mean", [])),
                  "loss": statistics.fmean(losses) if losses else None,
                  "grad_norm": statistics.fmean(grad_norms) if grad_norms else None,
                  "train_groups": len(groups),
                  "rollout_s": t_rollout, "step_s": dt,
                  "gen_tokens_per_s": sum(map(len, ro.completions)) / t_rollout}
        if cfg.eval_every and step % cfg.eval_every == 0:
            record |= held_out(step)
        # stop when another step like this one would end past the limit
        out_of_time = (cfg.time_limit_s > 0 and step < cfg.steps
                       and time.perf_counter() - start_time + dt > cfg.time_limit_s)
        if step % cfg.log_every == 0 or step == cfg.steps or out_of_time or "eval/mean" in record:
            log(record)
        bar.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.3f}")
        bar.update()
        if step == cfg.steps or out_of_time or (cfg.save_every and step % cfg.save_every == 0):
            save_checkpoint(out_dir / f"checkpoint-{step:06d}", policy, optimizer, step, cfg, source, tokenizer)
        if out_of_time:
            log({"step": step, "stopped": f"time_limit_s={cfg.time_limit_s}: no time for step {step + 1}"})
            break
    bar.close()
    plot_log(log_path, out_dir / "curve.svg", title=f"GRPO {out_dir.name}")
    return policy
