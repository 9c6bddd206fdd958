"""DPO: the loss on hand-built log-probs, sequence log-probs, pair encoding, and the trainer on a tiny MoE
(full fine-tuning against a frozen copy, and LoRA against the base with adapters off)."""

import json
import math

import pytest
import torch

from mixr import load_model
from mixr.tokenizer import Tokenizer
from mixr.train.config import TrainConfig
from mixr.train.dpo import encode_pair, sequence_logprobs, train_dpo
from mixr.train.lora import adapters_disabled, lora_parameters
from mixr.train.losses import dpo_loss
from mixr.train.sft import collate
from mixr.train.tasks import TASKS, generate

LN2 = math.log(2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- the loss

def test_dpo_loss_on_hand_built_logprobs():
    # pair 1: the policy gained 1 nat on chosen and lost 1 on rejected relative to the reference;
    # pair 2: it moved the wrong way by 3 nats in total; pair 3: it did not move.
    pc = torch.tensor([-4.0, -10.0, -2.0], requires_grad=True)
    pr = torch.tensor([-7.0, -5.0, -3.0], requires_grad=True)
    rc = torch.tensor([-5.0, -9.0, -2.0])
    rr = torch.tensor([-6.0, -7.0, -3.0])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # rewards 0.1 * (pi - ref): chosen [0.1, -0.1, 0], rejected [-0.1, 0.2, 0]; margins [0.2, -0.3, 0]
    torch.testing.assert_close(chosen, torch.tensor([0.1, -0.1, 0.0]))
    torch.testing.assert_close(rejected, torch.tensor([-0.1, 0.2, 0.0]))
    expected = (math.log1p(math.exp(-0.2)) + math.log1p(math.exp(0.3)) + LN2) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(0.7152138, abs=1e-6)  # the number itself, written out
    loss.backward()
    # dL/dpc_b = -beta * sigmoid(-margin_b) / B and dL/dpr_b = +beta * sigmoid(-margin_b) / B
    s = torch.sigmoid(-torch.tensor([0.2, -0.3, 0.0]))
    torch.testing.assert_close(pc.grad, -0.1 * s / 3)
    torch.testing.assert_close(pr.grad, 0.1 * s / 3)
    assert not chosen.requires_grad and not rejected.requires_grad


def test_dpo_loss_matches_float64_and_stays_finite():
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(64, generator=g, dtype=torch.float64) * 20 for _ in range(4)]
    beta = 0.3
    ref = -torch.nn.functional.logsigmoid(beta * ((x[0] - x[2]) - (x[1] - x[3]))).mean()
    loss, _, _ = dpo_loss(*(t.float() for t in x), beta=beta)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # a margin of +-1000 nats: ~0 and ~beta * 1000, never inf or nan
    big, _, _ = dpo_loss(torch.tensor([0.0]), torch.tensor([-1000.0]), torch.zeros(1), torch.zeros(1), beta=1.0)
    small, _, _ = dpo_loss(torch.tensor([-1000.0]), torch.tensor([0.0]), torch.zeros(1), torch.zeros(1), beta=1.0)
    assert big.item() == 0.0 and small.item() == pytest.approx(1000.0)


def test_sequence_logprobs_sum_the_answer_tokens():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.float32)
    logp = logits.double().log_softmax(-1)
    expected = [sum(logp[b, t - 1, ids[b, t]].item() for t in range(1, 5) if mask[b, t]) for b in range(2)]
    torch.testing.assert_close(sequence_logprobs(logits, ids, mask).double(),
                               torch.tensor(expected, dtype=torch.float64))


# ---------------------------------------------------------------- pairs

def pairs_for(n: int, seed: int = 0) -> list[dict]:
    """Arithmetic prompts: chosen = the reference solution, rejected = the same reasoning with a wrong answer."""
    rows = []
    for item in generate(TASKS["arithmetic"], n, seed=seed):
        wrong = item.solution.rsplit("\\boxed{", 1)[0] + f"\\boxed{{{item.answer + 7}}}"
        rows.append({"prompt": item.prompt, "chosen": item.solution, "rejected": wrong})
    return rows


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dpo") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs_for(4)))
    return path


def test_encode_pair(checkpoint):
    tok = Tokenizer.from_dir(checkpoint("deepseek_v3_noaux_tc"))
    row = pairs_for(1)[0]
    (c_ids, c_mask), (r_ids, r_mask) = encode_pair(tok, row)
    n_prompt = c_mask.index(1)
    assert c_ids[:n_prompt] == r_ids[:n_prompt] and r_mask.index(1) == n_prompt  # one rendered prompt
    for ids, mask, text in ((c_ids, c_mask, row["chosen"]), (r_ids, r_mask, row["rejected"])):
        assert tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False) == text + tok.eos_token
    with pytest.raises(ValueError, match="rejected"):
        encode_pair(tok, {"prompt": "p", "chosen": "c"})


# ---------------------------------------------------------------- the trainer

def dpo_cfg(model_dir, data, out_dir, **kw) -> TrainConfig:
    base = dict(mode="dpo", model=str(model_dir), data=str(data), out_dir=str(out_dir), steps=6, batch_size=4,
                lr=3e-3, warmup_steps=1, min_lr_ratio=1.0, weight_decay=0.0, dpo_beta=0.1, progress=False)
    return TrainConfig(**(base | kw))


def log_of(out_dir) -> list[dict]:
    return [json.loads(line) for line in open(out_dir / "log.jsonl")]


@torch.no_grad()
def margins(policy, reference, tokenizer, rows, beta) -> torch.Tensor:
    """beta * ((pi - ref)(chosen) - (pi - ref)(rejected)) per training pair."""
    pairs = [encode_pair(tokenizer, r) for r in rows]
    ids, mask, _ = collate([c for c, _ in pairs] + [r for _, r in pairs], tokenizer.eos_token_id)
    with reference() as ref:
        ref_logp = sequence_logprobs(ref(ids), ids, mask)
    d = sequence_logprobs(policy(ids), ids, mask) - ref_logp
    B = len(rows)
    return beta * (d[:B] - d[B:])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_raises_the_margin_on_the_training_pairs(checkpoint, pair_file, tmp_path, lora):
    import contextlib
    path = checkpoint("deepseek_v3_noaux_tc")
    tok = Tokenizer.from_dir(path)
    rows = [json.loads(line) for line in pair_file.read_text().splitlines()]
    policy = train_dpo(dpo_cfg(path, pair_file, tmp_path, **({"lora_r": 4, "lr": 1e-2} if lora else {})))
    log = log_of(tmp_path)
    # step 1 runs the policy before any update: it is the reference, so every reward is 0 and the loss ln 2
    assert log[0]["loss"] == pytest.approx(LN2, abs=1e-6) and log[0]["margin"] == pytest.approx(0, abs=1e-6)
    assert log[-1]["loss"] < log[0]["loss"] - 0.05 and log[-1]["margin"] > 0.3 and log[-1]["accuracy"] == 1.0
    start = load_model(path, dtype=torch.float32)
    reference = (lambda: adapters_disabled(policy)) if lora else (lambda: contextlib.nullcontext(start))
    m = margins(policy, reference, tok, rows, beta=0.1)
    assert (m > 0.3).all(), m
    if lora:  # the base is untouched and the adapter is what was saved
        for name, t in start.state_dict().items():
            assert torch.equal(policy.state_dict()[name], t), name
        assert (tmp_path / "checkpoint-000006" / "adapter_model.safetensors").is_file()
    else:
        saved = load_model(tmp_path / "checkpoint-000006", dtype=torch.float32)
        assert torch.equal(margins(saved, reference, tok, rows, beta=0.1), m)


def test_dpo_resume_matches_an_uninterrupted_run(checkpoint, pair_file, tmp_path):
    path = checkpoint("qwen2_moe")
    kw = dict(lora_r=2, steps=4, batch_size=2, grad_accum=2, warmup_steps=2, min_lr_ratio=0.1)
    straight = train_dpo(dpo_cfg(path, pair_file, tmp_path / "a", **kw))
    train_dpo(dpo_cfg(path, pair_file, tmp_path / "b", save_every=2, **kw | {"steps": 2}))
    resumed = train_dpo(dpo_cfg(path, pair_file, tmp_path / "b", resume_from=str(tmp_path / "b" / "checkpoint-000002"),
                                **kw))
    for a, b in zip(lora_parameters(straight), lora_parameters(resumed)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [r["loss"] for r in log_of(tmp_path / "b")] == [r["loss"] for r in log_of(tmp_path / "a")]


def test_cli_train_dpo_and_config_errors(checkpoint, pair_file, tmp_path):
    from mixr.cli import main
    path = checkpoint("deepseek_v3_noaux_tc")
    cfg = tmp_path / "dpo.toml"
    cfg.write_text(f'model = "{path}"\ndata = "{pair_file}"\nout_dir = "{tmp_path / "run"}"\nsteps = 1\n'
                   "batch_size = 2\nwarmup_steps = 1\nlora_r = 2\nprogress = false\n")
    main(["train", "dpo", "--config", str(cfg)])
    assert log_of(tmp_path / "run")[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(ValueError, match="row 1.*rejected"):
        train_dpo(dpo_cfg(path, bad, tmp_path / "bad"))
    with pytest.raises(ValueError, match="needs data"):
        TrainConfig(mode="dpo", model="m", tasks={"arithmetic": 1.0})
    with pytest.raises(ValueError, match="dpo_beta"):
        TrainConfig(mode="dpo", model="m", data="d", dpo_beta=0.0)
    with pytest.raises(ValueError, match="ref_model"):
        train_dpo(dpo_cfg(path, pair_file, tmp_path / "x", lora_r=2, ref_model=str(path)))
