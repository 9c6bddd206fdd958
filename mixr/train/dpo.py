"""Direct Preference Optimisation (Rafailov et al., 2023) from JSONL preference pairs: `mixr train dpo`.

A row is {"prompt", "chosen", "rejected"}: the prompt is rendered as a user turn by the chat template with its
generation prompt (as SFT renders it), each answer follows with eos, and a sequence's log-probability is the sum
over its answer tokens. `train_dpo(cfg)` is one flat loop: per step, the chosen and rejected rows of each
micro-batch go through the policy in one forward and through the frozen reference without gradients, then
`dpo_loss`, clip, AdamW, log, checkpoint.

The reference is the starting point, frozen: cfg.ref_model or cfg.model, loaded once beside the policy; with
LoRA (lora_r > 0) it is the policy's own base with the adapters switched off, so no second copy of the weights.
Logged per step: the loss, the implicit rewards beta * (log pi - log ref) of chosen and rejected answers, their
margin and the share of pairs the policy ranks right (accuracy), each a mean over the step's pairs.
The routers' balancing bias is left as it is (preference tuning is not meant to move the expert load).
"""

import contextlib
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mixr.checkpoint import load_model
from mixr.models.base import CausalLM
from mixr.tokenizer import Tokenizer
from mixr.train.config import TrainConfig
from mixr.train.lora import adapters_disabled, lora_model, lora_parameters, resume_step, save_lora_checkpoint
from mixr.train.losses import dpo_loss, token_logprobs
from mixr.train.sft import batch_indices, collate, encode_example, load_rows, lr_at, save_checkpoint

Example = tuple[list[int], list[int]]  # (token ids, loss mask)


def encode_pair(tokenizer: Tokenizer, row: dict, max_len: int | None = None) -> tuple[Example, Example]:
    """One preference row -> (chosen, rejected), each the prompt's chat rendering + answer + eos with the mask
    on the answer and eos (encode_example's SFT form)."""
    missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(row.get(k), str)]
    if missing:
        raise ValueError(f"a DPO row needs string fields prompt, chosen, rejected; missing or not text: {missing}")
    return tuple(encode_example(tokenizer, {"prompt": row["prompt"], "completion": row[k]}, "sft", max_len)
                 for k in ("chosen", "rejected"))


def sequence_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's target tokens: logits (B, L, V), ids (B, L), mask (B, L) -> (B,)
    float32. Position t predicts token t+1, counted where token t+1 is a target."""
    return (token_logprobs(logits[:, :-1], ids[:, 1:]) * mask[:, 1:]).sum(-1)


def load_pairs(cfg: TrainConfig, tokenizer: Tokenizer) -> list[tuple[Example, Example]]:
    pairs = []
    for i, row in enumerate(load_rows(cfg)):
        try:
            pairs.append(encode_pair(tokenizer, row, cfg.max_len))
        except ValueError as e:
            raise ValueError(f"{cfg.data}: row {i + 1}: {e}") from None
    if not pairs:
        raise ValueError(f"{cfg.data}: no preference pairs")
    return pairs


def train_dpo(cfg: TrainConfig) -> CausalLM:
    """Run DPO as configured; log.jsonl and checkpoint-<step>/ directories go to cfg.out_dir (full models, or
    adapters in peft's format with lora_r > 0). Returns the policy."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    tokenizer_dir = Path(cfg.tokenizer or cfg.model)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)

    # policy and reference
    if cfg.lora_r:
        if cfg.ref_model:
            raise ValueError("with LoRA the reference is the base model (adapters off); ref_model is not used")
        policy = lora_model(cfg, device)
        params = lora_parameters(policy)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

        def reference():
            return adapters_disabled(policy)
    else:
        policy = load_model(cfg.resume_from or cfg.model, device=device, dtype=torch.float32, progress=False)
        params = list(policy.parameters())
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
        ref = load_model(cfg.ref_model or cfg.model, device=device, dtype=torch.float32, progress=False)
        ref.eval().requires_grad_(False)

        def reference():
            return contextlib.nullcontext(ref)
    policy.train()
    step = resume_step(cfg, optimizer, device)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = load_pairs(cfg, tokenizer)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    bar = tqdm(total=cfg.steps, initial=step, desc="dpo", disable=not cfg.progress)
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = {"loss": 0.0, "reward_chosen": 0.0, "reward_rejected": 0.0, "margin": 0.0, "accuracy": 0.0,
                 "logp_chosen": 0.0, "logp_rejected": 0.0}
        n_tokens = 0
        for k in range(cfg.grad_accum):
            batch = [pairs[i] for i in batch_indices(len(pairs), cfg.batch_size, cfg.seed, step * cfg.grad_accum + k)]
            # rows 0..B-1 chosen, B..2B-1 rejected: one forward for both
            ids, mask, real = collate([c for c, _ in batch] + [r for _, r in batch], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            B = len(batch)
            with autocast:
                logp = sequence_logprobs(policy(ids), ids, mask)  # (2B,)
                with torch.no_grad(), reference() as ref_model:
                    ref_logp = sequence_logprobs(ref_model(ids), ids, mask)
            loss, chosen, rejected = dpo_loss(logp[:B], logp[B:], ref_logp[:B], ref_logp[B:], cfg.dpo_beta)
            (loss / cfg.grad_accum).backward()
            n_tokens += int(real.sum())
            for key, value in (("loss", loss.detach()), ("reward_chosen", chosen.mean()),
                               ("reward_rejected", rejected.mean()), ("margin", (chosen - rejected).mean()),
                               ("accuracy", (chosen > rejected).float().mean()),
                               ("logp_chosen", logp[:B].detach().mean()), ("logp_rejected", logp[B:].detach().mean())):
                stats[key] += value.item() / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        record = {"step": step, **stats, "lr": lr, "grad_norm": grad_norm.item(),
                  "tokens_per_s": n_tokens / (time.perf_counter() - t0)}
        if step % cfg.log_every == 0 or step == cfg.steps:
            with open(out_dir / "log.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{stats['loss']:.4f}", margin=f"{stats['margin']:.3f}")
        bar.update()
        if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
            path = out_dir / f"checkpoint-{step:06d}"
            if cfg.lora_r:
                save_lora_checkpoint(path, policy, optimizer, step, cfg)
            else:
                save_checkpoint(path, policy, optimizer, step, cfg, tokenizer_dir, tokenizer)
    bar.close()
    return policy
