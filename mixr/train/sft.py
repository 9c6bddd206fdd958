"""Pretraining and supervised fine-tuning of a CausalLM (DeepSeek-style MoE or dense) from a TrainConfig.

`train(config)` is one flat loop, read top to bottom: build or load the model, tokenize the data, then per
step: set the lr, forward/backward the micro-batches (next-token loss on the masked tokens, plus the optional
router balance losses), clip, AdamW step, nudge the routers' balancing bias from the observed expert load, log,
checkpoint.

Router statistics come from forward hooks on the `Router` modules (`RouterTap`); the model code is untouched.
Not implemented: Gumbel-softmax gating (the routers select experts deterministically).
"""

import json
import math
import random
import shutil
import time
from functools import lru_cache
from pathlib import Path

import torch
from tqdm import tqdm

from mixr.checkpoint import load_model, save_model
from mixr.layers.moe import Router
from mixr.models import config_from_hf
from mixr.models.base import CausalLM
from mixr.tokenizer import Tokenizer
from mixr.train.config import TrainConfig
from mixr.train.losses import router_z_loss, sequence_aux_loss, token_logprobs, update_router_bias
from mixr.train.tasks import TASKS, generate

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


# ---------------------------------------------------------------- data

def encode_example(tokenizer: Tokenizer, row: dict, mode: str = "sft", max_len: int | None = None
                   ) -> tuple[list[int], list[int]]:
    """One training row -> (token ids, loss mask); mask[i] = 1 when token i is a target.

    {"text": ...}: bos + text + eos, every token a target (raw pretraining text).
    {"prompt": ..., "completion": ...}: the user turn rendered by the chat template with its generation prompt
    (for R1's template that ends in `<｜Assistant｜><think>\\n`), then completion + eos. SFT trains only on the
    completion and eos; pretrain mode on everything.
    """
    eos = tokenizer.eos_token_id
    if "text" in row:
        ids = tokenizer.encode(row["text"], add_special_tokens=True) + [eos]
        mask = [1] * len(ids)
    else:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                               add_generation_prompt=True, tokenize=True)
        completion = tokenizer.encode(row["completion"], add_special_tokens=False) + [eos]
        ids = prompt + completion
        mask = [int(mode == "pretrain")] * len(prompt) + [1] * len(completion)
    return ids[:max_len], mask[:max_len]


def load_rows(cfg: TrainConfig) -> list[dict]:
    """The run's rows: a JSONL file, or the task suite's train-split problems with their reference solutions."""
    if cfg.data is not None:
        with open(cfg.data) as f:
            return [json.loads(line) for line in f if line.strip()]
    unknown = sorted(set(cfg.tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {sorted(TASKS)}")
    total = sum(cfg.tasks.values())
    rows = []
    for name, weight in cfg.tasks.items():
        n = round(cfg.num_examples * weight / total)
        rows += [{"prompt": it.prompt, "completion": it.solution}
                 for it in generate(TASKS[name], n, seed=cfg.seed, split="train")]
    random.Random(cfg.seed).shuffle(rows)
    return rows


def batch_indices(num_examples: int, batch_size: int, seed: int, index: int) -> list[int]:
    """The index-th batch of an endless stream of shuffled epochs: a pure function of its arguments, so a
    resumed run sees the same data as an uninterrupted one."""
    out = []
    for p in range(index * batch_size, (index + 1) * batch_size):
        epoch, i = divmod(p, num_examples)
        out.append(_epoch_order(num_examples, seed, epoch)[i])
    return out


@lru_cache(maxsize=2)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_examples))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: ids (B, L) long, loss mask (B, L) float, real (B, L) bool (False on padding).
    Right padding needs no attention mask: causal attention never lets a real token see the padding after it."""
    L = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), L)
    real = torch.zeros(len(examples), L, dtype=torch.bool)
    for b, (x, m) in enumerate(examples):
        ids[b, :len(x)] = torch.tensor(x)
        mask[b, :len(m)] = torch.tensor(m, dtype=torch.float32)
        real[b, :len(x)] = True
    return ids, mask, real


# ---------------------------------------------------------------- router statistics

class RouterTap:
    """Forward hooks on every Router of a model. After each forward, `last[router]` holds its
    (logits (T, E) float32, differentiable; expert ids (T, K)), T = B * L in the order of the flattened batch.
    """

    def __init__(self, model: torch.nn.Module):
        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        self.last: dict[Router, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [r.register_forward_hook(self._after) for r in self.routers]

    def _after(self, module, args, output):
        _, ids, logits = output
        self.last[module] = (logits, ids)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def router_probs(router: Router, logits: torch.Tensor) -> torch.Tensor:
    """Per-token affinities normalised over experts, as DeepSeek-V3's balance loss uses them."""
    if router.opts.scoring_func == "softmax":
        return logits.softmax(-1)
    s = logits.sigmoid()
    return s / s.sum(-1, keepdim=True)


def load_imbalance(counts: torch.Tensor) -> float:
    """max / mean tokens per expert: 1.0 is perfectly balanced, E / K the worst."""
    counts = counts.float()
    return (counts.max() / counts.mean().clamp(min=1e-9)).item()


# ---------------------------------------------------------------- schedule and checkpoints

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps to lr, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def save_checkpoint(path: Path, model: CausalLM, optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig,
                    tokenizer_dir: Path, tokenizer: Tokenizer) -> Path:
    """An HF-format model directory (mixr and transformers load it; tokenizer files included, so LLM(path)
    runs it) plus trainer_state.pt (step, optimizer, config) for resume_from."""
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, path)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file() and tokenizer_dir.resolve() != path.resolve():
            shutil.copy(tokenizer_dir / name, path / name)
    if not (path / "generation_config.json").is_file():
        (path / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": [tokenizer.eos_token_id]}, indent=2))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": cfg.to_dict()},
               path / "trainer_state.pt")
    return path


def build_model(cfg: TrainConfig, tokenizer: Tokenizer) -> CausalLM:
    """A model from config.json keys (vocab and special ids filled from the tokenizer), randomly initialised."""
    hf = dict(cfg.model_config)
    hf.setdefault("vocab_size", len(tokenizer))
    hf.setdefault("bos_token_id", tokenizer.bos_token_id)
    hf.setdefault("eos_token_id", tokenizer.eos_token_id)
    if hf["vocab_size"] < len(tokenizer):
        raise ValueError(f"model_config vocab_size {hf['vocab_size']} < the tokenizer's {len(tokenizer)} ids")
    model = config_from_hf(hf).build()
    model.init_weights(std=cfg.init_std, generator=torch.Generator().manual_seed(cfg.seed))
    return model


# ---------------------------------------------------------------- the loop

def train(cfg: TrainConfig) -> CausalLM:
    """Run pretraining or SFT as configured; checkpoints and log.jsonl go to cfg.out_dir. Returns the model."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)

    # model and tokenizer: float32 master weights whatever the checkpoint's dtype
    source = cfg.resume_from or cfg.model  # a model directory, or None: build from model_config
    tokenizer_dir = Path(cfg.resume_from or cfg.tokenizer or cfg.model)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    if source:
        model = load_model(source, device=device, dtype=torch.float32, progress=False)
    else:
        model = build_model(cfg, tokenizer).to(device)
    model.train()
    tap = RouterTap(model)
    balanced = [r for r in tap.routers if hasattr(r, "e_score_correction_bias")]

    # optimizer: no weight decay on norms and other vectors
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    step = 0
    if cfg.resume_from:
        state = torch.load(Path(cfg.resume_from) / "trainer_state.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]

    # data: tokenized once; batches are drawn by index so that resuming continues the same stream
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = [encode_example(tokenizer, row, cfg.mode, cfg.max_len) for row in load_rows(cfg)]
    if not examples:
        raise ValueError("no training examples")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.mode}", disable=not cfg.progress)
    started, dt = time.perf_counter(), 0.0
    while step < cfg.steps:
        t0 = time.perf_counter()
        if cfg.time_limit_s and t0 + dt - started > cfg.time_limit_s:  # the last step's time predicts this one's
            save_checkpoint(out_dir / f"checkpoint-{step:06d}", model, optimizer, step, cfg, tokenizer_dir, tokenizer)
            break
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        micro = [collate([examples[i] for i in batch_indices(len(examples), cfg.batch_size, cfg.seed,
                                                              step * cfg.grad_accum + k)], pad_id)
                 for k in range(cfg.grad_accum)]
        n_targets = sum(m[:, 1:].sum() for _, m, _ in micro).clamp(min=1)  # the step's loss is a mean over these
        counts = {r: torch.zeros(r.opts.num_experts, device=device) for r in tap.routers}
        lm_total = aux_total = z_total = 0.0
        for ids, mask, real in micro:
            ids, mask, real = ids.to(device), mask.to(device), real.to(device)
            with autocast:
                logits = model(ids)  # (B, L, V)
            # next-token loss: position t predicts token t+1, counted where token t+1 is a target
            logp = token_logprobs(logits[:, :-1], ids[:, 1:])  # (B, L-1)
            lm_loss = -(logp * mask[:, 1:]).sum() / n_targets
            # router statistics and balance losses from the hooks; padding excluded
            aux_loss = torch.zeros((), device=device)
            z_loss = torch.zeros((), device=device)
            B, L = ids.shape
            for r in tap.routers:
                r_logits, r_ids = tap.last[r]  # (B*L, E), (B*L, K)
                counts[r] += torch.bincount(r_ids[real.view(-1)].view(-1), minlength=r.opts.num_experts)
                if cfg.seq_aux_alpha > 0:
                    aux_loss = aux_loss + sequence_aux_loss(router_probs(r, r_logits).view(B, L, -1),
                                                            r_ids.view(B, L, -1), r.opts.num_experts,
                                                            cfg.seq_aux_alpha, real)
                if cfg.z_loss_coef > 0:
                    z_loss = z_loss + cfg.z_loss_coef * router_z_loss(r_logits, real.view(-1))
            loss = lm_loss + (aux_loss + z_loss) / cfg.grad_accum
            loss.backward()
            lm_total += lm_loss.item()
            aux_total += aux_loss.item() / cfg.grad_accum
            z_total += z_loss.item() / cfg.grad_accum
        tap.last.clear()

        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0
                                                   else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # aux-loss-free balancing: push each noaux_tc router's selection bias toward equal load
        if cfg.bias_update_speed > 0:
            for r in balanced:
                update_router_bias(r.e_score_correction_bias, counts[r], cfg.bias_update_speed)
        step += 1

        dt = time.perf_counter() - t0
        n_tokens = sum(int(real.sum()) for _, _, real in micro)
        imbalance = [load_imbalance(c) for c in counts.values()]
        record = {"step": step, "loss": lm_total + aux_total + z_total, "lm_loss": lm_total, "aux_loss": aux_total,
                  "z_loss": z_total, "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s": n_tokens / dt,
                  "load_imbalance": sum(imbalance) / len(imbalance) if imbalance else None,
                  "load_imbalance_max": max(imbalance) if imbalance else None}
        if step % cfg.log_every == 0 or step == cfg.steps:
            with open(out_dir / "log.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
        bar.update()
        if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
            save_checkpoint(out_dir / f"checkpoint-{step:06d}", model, optimizer, step, cfg, tokenizer_dir, tokenizer)
    bar.close()
    tap.remove()
    return model
