"""Training: task verifiers, loss functions on hand-built tensors, and the SFT loop on a tiny DeepSeek-V3 MoE."""

import json
import math
import shutil

import pytest
import torch

from mixr import load_model, save_model
from mixr.layers.moe import Router, RouterOptions
from mixr.tiny import tiny_deepseek_config
from mixr.tiny_tokenizer import build_tokenizer
from mixr.tokenizer import Tokenizer
from mixr.train.config import TrainConfig, load_config
from mixr.train.losses import (dpo_loss, entropy, group_advantages, policy_loss, router_z_loss, sequence_aux_loss,
                               token_logprobs, update_router_bias)
from mixr.train.sft import RouterTap, build_model, collate, encode_example, load_imbalance, lr_at, train
from mixr.train.tasks import (FORMAT_WEIGHT, TASKS, Arithmetic, Countdown, RewardResult, generate,
                              parse_expression, split_of)

LN2 = math.log(2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: a second intra-op thread only adds spin-waiting, which on a busy 2-core machine
    makes each step 10-50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def think(reasoning: str, tail: str) -> str:
    return f"{reasoning}\n</think>\n\n{tail}"


# ---------------------------------------------------------------- tasks

def test_arithmetic_reward():
    r = TASKS["arithmetic"].reward
    assert r(think("7*6=42", "\\boxed{42}"), 42) == RewardResult(1 + FORMAT_WEIGHT, 1.0, 1.0)
    assert r("<think>7*6=42</think>\\boxed{42}", 42) == RewardResult(1 + FORMAT_WEIGHT, 1.0, 1.0)
    assert r(think("7*6=41", "\\boxed{41}"), 42) == RewardResult(FORMAT_WEIGHT, 1.0, 0.0)
    assert r(think("big", "\\boxed{1,234}"), 1234).correct == 1.0
    assert r(think("neg", "\\boxed{ -5 }"), -5).correct == 1.0
    # correctness is scored without the format: a bare box is right but earns no format reward
    assert r("\\boxed{42}", 42) == RewardResult(1.0, 0.0, 1.0)
    # malformed: nothing to parse -> correct is None
    assert r(think("7*6=42", "42"), 42) == RewardResult(0.0, 0.0, None)
    assert r(think("x", "\\boxed{forty-two}"), 42) == RewardResult(FORMAT_WEIGHT, 1.0, None)
    assert r(think("x", "\\boxed{42"), 42).correct is None
    # format failures: empty reasoning, two think blocks, two boxes (the last one counts for correctness)
    assert r(think("  ", "\\boxed{42}"), 42) == RewardResult(1.0, 0.0, 1.0)
    assert r("a</think>b</think>\\boxed{42}", 42).format == 0.0
    assert r(think("a<think>b", "\\boxed{42}"), 42).format == 0.0
    assert r(think("a", "\\boxed{1} \\boxed{42}"), 42) == RewardResult(1.0, 0.0, 1.0)
    # a box inside the reasoning is not the answer
    assert r(think("maybe \\boxed{42}?", "\\boxed{41}"), 42).correct == 0.0


def test_countdown_parser_is_exact_and_safe():
    assert parse_expression("2+3*4") == (14, [2, 3, 4])
    assert parse_expression("(2+3)*4")[0] == 20
    assert parse_expression("8/3*3")[0] == 8  # exact fractions, not floats
    assert parse_expression("10-2-3")[0] == 5  # left-associative
    for bad in ["__import__('os')", "2**3", "-3+5", "3*8=24", "(1+2", "1+", "", "3 8", "1.5*2", "x"]:
        with pytest.raises(ValueError):
            parse_expression(bad)
    with pytest.raises(ValueError, match="too long"):
        parse_expression("(" * 500 + "1" + ")" * 500)


def test_countdown_reward():
    r, ans = TASKS["countdown"].reward, {"numbers": [2, 3, 5, 8], "target": 24}
    assert r(think("8*3", "\\boxed{8*3}"), ans) == RewardResult(1 + FORMAT_WEIGHT, 1.0, 1.0)  # a subset is fine
    assert r(think("5-2=3", "\\boxed{8*(5-2)}"), ans).correct == 1.0
    assert r(think("x", "\\boxed{(8-5)*8}"), ans).correct == 0.0       # 8 used twice
    assert r(think("x", "\\boxed{(5+3)*(2+1)}"), ans).correct == 0.0   # 1 is not given
    assert r(think("x", "\\boxed{8+5+3+2}"), ans).correct == 0.0       # wrong value
    assert r(think("x", "\\boxed{8/(5-5)}"), ans).correct == 0.0       # x/0: well-formed, wrong
    assert r(think("x", "\\boxed{__import__('os')}"), ans) == RewardResult(FORMAT_WEIGHT, 1.0, None)
    assert r(think("x", "\\boxed{8*3=24}"), ans).correct is None
    assert r(think("x", "24"), ans).correct is None


def test_word_problem_reward():
    r = TASKS["gsm8k"].reward
    assert r(think("3*4=12", "\\boxed{12}"), 12).correct == 1.0
    assert r(think("3*4=12", "\\boxed{$12}"), 12).correct == 1.0
    assert r(think("3*4=12", "\\boxed{12 apples}"), 12).correct is None
    assert r(think("3*4=13", "\\boxed{13}"), 12).correct == 0.0


@pytest.mark.parametrize("name", sorted(TASKS))
def test_reference_solutions_earn_full_reward(name):
    task = TASKS[name]
    for item in generate(task, 300, seed=3):
        assert item.task == name
        assert task.reward(item.solution, item.answer) == RewardResult(1 + FORMAT_WEIGHT, 1.0, 1.0), item
        # and a wrong answer in the same format does not
        wrong = item.solution.rsplit("\\boxed{", 1)[0] + "\\boxed{999999}"
        assert task.reward(wrong, item.answer).correct == 0.0


@pytest.mark.parametrize("name", sorted(TASKS))
def test_held_out_split_is_disjoint(name):
    task = TASKS[name]
    train = generate(task, 1000, seed=0) + generate(task, 1000, seed=1)
    test = generate(task, 200, seed=0, split="test")
    assert {i.key for i in train}.isdisjoint({i.key for i in test})
    assert all(split_of(name, i.key) == "train" for i in train)
    assert all(split_of(name, i.key) == "test" for i in test)
    assert len({i.key for i in test}) == 200  # unique within a split
    assert [i.prompt for i in generate(task, 20, seed=0)] == [i.prompt for i in train[:20]]  # reproducible
    assert [i.prompt for i in train[:20]] != [i.prompt for i in train[1000:1020]]  # seeds differ


def test_split_is_about_ten_percent_and_key_based():
    keys = [f"{a}+{b}" for a in range(100) for b in range(100)]
    frac = sum(split_of("arithmetic", k) == "test" for k in keys) / len(keys)
    assert 0.08 < frac < 0.12
    # a word problem with other names is the same problem: the key holds only its template and numbers
    assert all(":" in i.key and not any(c.isalpha() for c in i.key) for i in generate(TASKS["gsm8k"], 50))


def test_task_options():
    items = generate(Arithmetic(min_digits=4, max_digits=4, ops=("*",)), 50)
    assert all(len(str(x)) == 4 for i in items for x in i.key.split("*"))
    assert all(3 <= len(i.answer["numbers"]) <= 3 for i in generate(Countdown(max_numbers=3), 50))


# ---------------------------------------------------------------- losses

def test_token_logprobs_and_entropy():
    logits = torch.tensor([[0.0, math.log(3)]])
    assert token_logprobs(logits, torch.tensor([1])).item() == pytest.approx(math.log(0.75))
    assert entropy(logits).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 3), generator=g)
    ref = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits.float(), targets).double(), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy(torch.zeros(4, 7)), torch.full((4,), math.log(7)))


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    # group 1: mean 0.5, sample std sqrt(1/3); group 2: no variance -> no signal
    s = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(group_advantages(rewards[:4], 4, eps=0.0), torch.tensor([s, -s, -s, s]))
    e = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # the default eps; an all-equal group gives 0, not 0/0
    torch.testing.assert_close(group_advantages(rewards, 4), torch.tensor([e, -e, -e, e, 0, 0, 0, 0]))
    torch.testing.assert_close(group_advantages(rewards, 4, scale=False),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    torch.testing.assert_close(group_advantages(torch.tensor([3.0, 1.0]), 2, eps=0.0),
                               torch.tensor([1 / math.sqrt(2), -1 / math.sqrt(2)]))
    with pytest.raises(ValueError):
        group_advantages(rewards, 3)


def _policy_case():
    """ratios [1.5, 0.9, 0.5 | 1.1, 0.7, 1.3], advantages [+1 | -2], last token of row 2 masked.
    Per-token loss -min(r A, clip(r) A): [-1.2 (high-clipped), -0.9, -0.5 | 2.2, 1.6 (low-clipped), (2.6)]."""
    logp = torch.log(torch.tensor([[1.5, 0.9, 0.5], [1.1, 0.7, 1.3]])).requires_grad_()
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logp, old, adv, mask


def test_policy_loss_aggregations_and_clipping():
    logp, old, adv, mask = _policy_case()
    loss, stats = policy_loss(logp, old, None, adv, mask)
    assert loss.item() == pytest.approx((-1.2 - 0.9 - 0.5 + 2.2 + 1.6) / 5)  # token-mean
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)
    assert stats["clip_low_frac"].item() == pytest.approx(1 / 5)
    assert stats["clip_high_frac"].item() == pytest.approx(1 / 5)
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 0.9 + 0.5 + 1.1 + 0.7) / 5)
    assert "kl" not in stats
    # gradient: zero where clipped or masked; d(-r A)/dlogp = -r A / 5 elsewhere
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.9 / 5, -0.5 / 5], [2.2 / 5, 0.0, 0.0]]))

    seq, _ = policy_loss(logp, old, None, adv, mask, aggregation="seq-mean")
    assert seq.item() == pytest.approx(((-1.2 - 0.9 - 0.5) / 3 + (2.2 + 1.6) / 2) / 2)
    dr, _ = policy_loss(logp, old, None, adv, mask, aggregation="dr-grpo")
    assert dr.item() == pytest.approx(1.2 / (2 * 3))
    dr10, _ = policy_loss(logp, old, None, adv, mask, aggregation="dr-grpo", max_len=10)
    assert dr10.item() == pytest.approx(1.2 / (2 * 10))
    # per-token advantages give the same as per-sequence ones broadcast
    same, _ = policy_loss(logp, old, None, adv[:, None].expand(2, 3), mask)
    assert same.item() == pytest.approx(loss.item())
    # DAPO's clip-higher: the high clip moves to 1.28
    higher, _ = policy_loss(logp, old, None, adv, mask, clip_eps_high=0.28)
    assert higher.item() == pytest.approx((-1.28 - 0.9 - 0.5 + 2.2 + 1.6) / 5)
    with pytest.raises(ValueError):
        policy_loss(logp, old, None, adv, mask, aggregation="sum")


def test_policy_loss_kl_term():
    logp, old, adv, mask = _policy_case()
    # ref - logp = [ln2, 0, -ln2 | 0, ln2, 5 (masked)]; k3 = e^d - d - 1
    d = torch.tensor([[LN2, 0.0, -LN2], [0.0, LN2, 5.0]])
    ref = logp.detach() + d
    k3 = [2 - LN2 - 1, 0.0, 0.5 + LN2 - 1, 0.0, 2 - LN2 - 1]
    kl_mean = sum(k3) / 5
    loss, stats = policy_loss(logp, old, ref, adv, mask, beta=0.1)
    assert stats["kl"].item() == pytest.approx(kl_mean)
    assert loss.item() == pytest.approx(1.2 / 5 + 0.1 * kl_mean)
    # with beta = 0 the KL is still reported but not in the loss
    loss0, stats0 = policy_loss(logp, old, ref, adv, mask, beta=0.0)
    assert loss0.item() == pytest.approx(1.2 / 5) and stats0["kl"].item() == pytest.approx(kl_mean)
    # the KL gradient d/dlogp [beta (e^d - d - 1)] = beta (1 - e^d) on the first token: unclipped part is 0 there
    loss.backward()
    assert logp.grad[0, 0].item() == pytest.approx(0.1 * (1 - 2) / 5)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old, None, adv, mask, beta=0.1)


def test_dpo_loss():
    pc = torch.tensor([-10.0, -5.0], requires_grad=True)
    pr = torch.tensor([-12.0, -5.0])
    rc, rr = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -6.0])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # margins: 0.5*(1) - 0.5*(-1) = 1 and 0.5*(-1) - 0.5*(1) = -1
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2)
    torch.testing.assert_close(chosen, torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(rejected, torch.tensor([-0.5, 0.5]))
    loss.backward()
    # dL/dpc_b = -beta * sigmoid(-margin_b) / B: raising the chosen log-prob lowers the loss
    torch.testing.assert_close(pc.grad, torch.tensor([-0.5 * torch.sigmoid(torch.tensor(-1.0)).item() / 2,
                                                      -0.5 * torch.sigmoid(torch.tensor(1.0)).item() / 2]))


def test_update_router_bias_signs():
    bias = torch.zeros(4)
    update_router_bias(bias, torch.tensor([10, 2, 4, 4]), gamma=0.1)  # mean 5
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    update_router_bias(bias, torch.tensor([5, 5, 6, 4]), gamma=0.1)
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.0, 0.2]))
    p = torch.nn.Parameter(torch.zeros(2))
    update_router_bias(p, torch.tensor([3, 1]), 1.0)  # in place even on a leaf that requires grad
    assert p.tolist() == [-1.0, 1.0] and p.grad is None


def test_bias_update_balances_a_skewed_router():
    torch.manual_seed(0)
    opts = RouterOptions(num_experts=8, top_k=2, scoring_func="sigmoid", topk_method="noaux_tc", n_group=2,
                         topk_group=1, norm_topk_prob=True, correction_bias=True)
    router = Router(16, opts)
    x = torch.randn(512, 16)
    x[:, 0] = 1.0  # a feature every token has, which only experts 0 and 1 read, strongly
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        router.weight[:, 0] = 0.0
        router.weight[:2, 0] = 4.0

    def counts() -> torch.Tensor:
        return torch.bincount(router(x)[1].flatten(), minlength=8)

    before = load_imbalance(counts())
    assert before > 3.0  # 4.0 is every token on the same 2 of 8 experts
    for _ in range(100):
        update_router_bias(router.e_score_correction_bias, counts(), gamma=0.01)
    assert load_imbalance(counts()) < 1.3
    assert router.e_score_correction_bias[:2].max() < 0 < router.e_score_correction_bias[2:].min()


def test_sequence_aux_loss():
    probs = torch.tensor([[[0.8, 0.2], [0.6, 0.4]]], requires_grad=True)  # (B=1, T=2, E=2)
    ids = torch.tensor([[[0], [0]]])                                      # (1, 2, K=1)
    # f = E/(K T) * counts = [2, 0], P = [0.7, 0.3] -> alpha * 1.4
    assert sequence_aux_loss(probs, ids, 2, alpha=0.5).item() == pytest.approx(0.7)
    # masking the second token: T = 1, f = [2, 0], P = [0.8, 0.2]
    assert sequence_aux_loss(probs, ids, 2, 0.5, mask=torch.tensor([[1, 0]])).item() == pytest.approx(0.8)
    # balanced routing gives alpha
    E, K, T = 8, 2, 16
    uniform = torch.full((3, T, E), 1 / E)
    balanced = torch.arange(3 * T * K).view(3, T, K) % E
    assert sequence_aux_loss(uniform, balanced, E, alpha=0.01).item() == pytest.approx(0.01)
    sequence_aux_loss(probs, ids, 2, 0.5).backward()
    torch.testing.assert_close(probs.grad, torch.tensor([[[0.5, 0.0], [0.5, 0.0]]]))  # alpha * f_i / T


def test_router_z_loss():
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])  # logsumexp: ln 2, ln 4
    assert router_z_loss(logits).item() == pytest.approx((LN2**2 + math.log(4) ** 2) / 2)
    assert router_z_loss(logits, mask=torch.tensor([1, 0])).item() == pytest.approx(LN2**2)


# ---------------------------------------------------------------- the SFT loop on a tiny DeepSeek-V3 MoE

def tiny_hf() -> dict:
    """DeepSeek-V3 layout (MLA, 1 dense + 2 MoE layers, 8 experts in 2 groups, top-2, sigmoid noaux_tc), dim 32."""
    hf = tiny_deepseek_config(0, 0, 0)
    for key in ("vocab_size", "bos_token_id", "eos_token_id"):  # filled from the tokenizer
        hf.pop(key)
    hf.update(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, q_lora_rank=24, kv_lora_rank=16,
              qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    return hf


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Four fixed arithmetic SFT rows: one batch of 4 is the whole data set."""
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    rows = [{"prompt": i.prompt, "completion": i.solution} for i in generate(TASKS["arithmetic"], 4, seed=0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tok_dir, out_dir, **kw) -> TrainConfig:
    base = dict(model_config=tiny_hf(), tokenizer=str(tok_dir), out_dir=str(out_dir), steps=5, batch_size=4,
                lr=1e-2, warmup_steps=1, min_lr_ratio=1.0, weight_decay=0.0, bias_update_speed=0.0, progress=False)
    return TrainConfig(**(base | kw))


def batch_loss(model, tokenizer, data_file) -> float:
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    ids, mask, _ = collate([encode_example(tokenizer, r) for r in rows], tokenizer.eos_token_id)
    with torch.no_grad():
        logp = token_logprobs(model(ids)[:, :-1], ids[:, 1:])
    return (-(logp * mask[:, 1:]).sum() / mask[:, 1:].sum()).item()


def log_of(out_dir) -> list[dict]:
    return [json.loads(line) for line in open(out_dir / "log.jsonl")]


def test_encode_example_masks_the_prompt(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    row = {"prompt": "What is 2 + 3?", "completion": "2+3=5\n</think>\n\n\\boxed{5}"}
    ids, mask = encode_example(tok, row)
    prompt = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False)
    target = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert prompt.endswith("What is 2 + 3?<｜Assistant｜><think>\n") and prompt.startswith(tok.bos_token)
    assert target == row["completion"] + tok.eos_token
    assert mask == sorted(mask)  # prompt first, then the targets
    ids_pt, mask_pt = encode_example(tok, row, mode="pretrain")
    assert ids_pt == ids and all(mask_pt)
    ids_t, mask_t = encode_example(tok, {"text": "hello"}, max_len=2)
    assert ids_t == [tok.bos_token_id, *tok.encode("hello", add_special_tokens=False)][:2] and mask_t == [1, 1]


def test_lr_schedule():
    cfg = TrainConfig(model="x", data="y", lr=1.0, warmup_steps=4, steps=13, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg) == pytest.approx(1.0)
    assert lr_at(8, cfg) == pytest.approx(0.55)  # halfway through the cosine (steps 4..12)
    assert lr_at(12, cfg) == pytest.approx(0.1)  # the last step


def test_one_step_changes_parameters_and_lowers_loss(tok_dir, data_file, tmp_path):
    tok = Tokenizer.from_dir(tok_dir)
    cfg = config(tok_dir, tmp_path, data=str(data_file), steps=1, lr=3e-3)
    before = build_model(cfg, tok)  # the same seeded initialisation train() starts from
    after = train(cfg)
    changed = [n for n, p in before.named_parameters() if not torch.equal(p, after.get_parameter(n))]
    assert len(changed) == len(list(before.parameters()))  # every weight, router and experts included
    assert batch_loss(after, tok, data_file) < batch_loss(before, tok, data_file) - 0.01
    # the logged loss is the pre-step loss over completion tokens only (no prompt, no padding)
    assert log_of(tmp_path)[0]["lm_loss"] == pytest.approx(batch_loss(before, tok, data_file), rel=1e-5)


def test_overfits_a_fixed_batch(tok_dir, data_file, tmp_path):
    train(config(tok_dir, tmp_path, data=str(data_file), steps=15))
    log = log_of(tmp_path)
    assert [r["step"] for r in log] == list(range(1, 16))
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["load_imbalance"] >= 1 for r in log)


def skewed_checkpoint(tok_dir, path):
    """A tiny model whose routers send most tokens to experts 0 and 1: embedding dim 0 is a constant that
    dominates the normalised hidden state, and only those experts' router rows read it. The other router weights
    are large enough that tokens still differ, so balance is reachable (with identical tokens, any bias could
    only move the whole load from one pair of experts to another)."""
    tok = Tokenizer.from_dir(tok_dir)
    model = build_model(config(tok_dir, path, data="unused"), tok)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.1
        for r in RouterTap(model).routers:
            r.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
            r.weight[:, 0] = 0.0
            r.weight[:2, 0] = 1.0
    save_model(model, path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, path / f)
    return path


def expert_imbalance(model, tokenizer, data_file) -> float:
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    ids, _, real = collate([encode_example(tokenizer, r) for r in rows], tokenizer.eos_token_id)
    tap = RouterTap(model)
    with torch.no_grad():
        model(ids)
    imbalance = [load_imbalance(torch.bincount(tap.last[r][1][real.view(-1)].flatten(), minlength=8))
                 for r in tap.routers]
    tap.remove()
    return max(imbalance)


def test_bias_update_balances_expert_load_in_training(tok_dir, data_file, tmp_path):
    start = skewed_checkpoint(tok_dir, tmp_path / "start")
    tok = Tokenizer.from_dir(start)
    skewed = expert_imbalance(load_model(start), tok, data_file)
    assert skewed > 3.0
    kw = dict(model=str(start), model_config=None, data=str(data_file), steps=20, lr=1e-3)
    plain = train(config(tok_dir, tmp_path / "plain", bias_update_speed=0.0, **kw))
    balanced = train(config(tok_dir, tmp_path / "balanced", bias_update_speed=0.05, **kw))
    without, with_bias = expert_imbalance(plain, tok, data_file), expert_imbalance(balanced, tok, data_file)
    assert without > 2.5  # the gradient alone hardly moves it
    assert with_bias < 1.6 and with_bias < 0.6 * without
    log = log_of(tmp_path / "balanced")
    assert log[-1]["load_imbalance"] < log[0]["load_imbalance"]


def test_checkpoint_round_trip(tok_dir, data_file, tmp_path):
    from transformers import AutoModelForCausalLM
    model = train(config(tok_dir, tmp_path, data=str(data_file), steps=3, bias_update_speed=0.01))
    ckpt = tmp_path / "checkpoint-000003"
    assert (ckpt / "trainer_state.pt").is_file() and (ckpt / "tokenizer.json").is_file()
    loaded = load_model(ckpt)
    assert loaded.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0  # the updated bias is saved
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
        ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        torch.testing.assert_close(ref(ids).logits, model(ids), rtol=0, atol=1e-5)


def test_resume_matches_an_uninterrupted_run(tok_dir, tmp_path):
    kw = dict(tasks={"arithmetic": 1.0, "gsm8k": 1.0}, num_examples=12, steps=6, batch_size=4, grad_accum=2,
              warmup_steps=2, min_lr_ratio=0.1, bias_update_speed=0.01)
    straight = train(config(tok_dir, tmp_path / "a", **kw))
    train(config(tok_dir, tmp_path / "b", save_every=3, **kw | {"steps": 3}))
    resumed = train(config(tok_dir, tmp_path / "b", resume_from=str(tmp_path / "b" / "checkpoint-000003"), **kw))
    for name, t in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], t, rtol=0, atol=0, msg=name)
    assert [r["step"] for r in log_of(tmp_path / "b")] == list(range(1, 7))
    assert [r["lr"] for r in log_of(tmp_path / "b")] == [r["lr"] for r in log_of(tmp_path / "a")]


def test_router_losses_reach_the_router_through_the_hooks(tok_dir, data_file, tmp_path):
    tok = Tokenizer.from_dir(tok_dir)
    model = build_model(config(tok_dir, tmp_path, data="unused"), tok)
    tap = RouterTap(model)
    ids, _, real = collate([encode_example(tok, json.loads(line)) for line in data_file.read_text().splitlines()], tok.eos_token_id)
    model(ids)
    B, L = ids.shape
    loss = 0
    for r in tap.routers:
        logits, top = tap.last[r]
        s = logits.sigmoid()
        loss = loss + sequence_aux_loss((s / s.sum(-1, keepdim=True)).view(B, L, -1), top.view(B, L, -1), 8, 1.0,
                                        real) + router_z_loss(logits)
    loss.backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in tap.routers)
    assert model.lm_head.weight.grad is None  # nothing but the routers' inputs and weights is involved
    # and in the loop, both terms are logged
    train(config(tok_dir, tmp_path / "run", data=str(data_file), steps=2, seq_aux_alpha=1e-3, z_loss_coef=1e-3))
    log = log_of(tmp_path / "run")
    assert all(r["aux_loss"] > 0 and r["z_loss"] > 0 for r in log)
    assert log[0]["loss"] == pytest.approx(log[0]["lm_loss"] + log[0]["aux_loss"] + log[0]["z_loss"])


def test_bf16_autocast(tok_dir, data_file, tmp_path):
    tok = Tokenizer.from_dir(tok_dir)
    model = build_model(config(tok_dir, tmp_path, data="unused"), tok)
    tap = RouterTap(model)
    ids = torch.randint(0, 512, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    assert logits.dtype == torch.bfloat16  # autocast is on for the matmuls...
    assert all(tap.last[r][0].dtype == torch.float32 for r in tap.routers)  # ...and off for the routers
    train(config(tok_dir, tmp_path / "run", data=str(data_file), steps=8, dtype="bfloat16"))
    log = log_of(tmp_path / "run")
    assert log[-1]["loss"] < 0.9 * log[0]["loss"]


def test_config_files(tmp_path):
    (tmp_path / "a.yaml").write_text("mode: pretrain\nmodel: m\ntasks:\n  countdown: 2\n  gsm8k: 1\n"
                                     "lr: 0.001\nbetas: [0.9, 0.99]\n")
    (tmp_path / "a.toml").write_text('mode = "pretrain"\nmodel = "m"\nlr = 0.001\nbetas = [0.9, 0.99]\n'
                                     '[tasks]\ncountdown = 2\ngsm8k = 1\n')
    a, b = load_config(tmp_path / "a.yaml"), load_config(tmp_path / "a.toml")
    assert a == b and a.tasks == {"countdown": 2, "gsm8k": 1} and a.betas == (0.9, 0.99) and a.mode == "pretrain"
    assert load_config(tmp_path / "a.yaml", steps=7).steps == 7
    (tmp_path / "bad.yaml").write_text("model: m\ndata: d\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="exactly one of model"):
        TrainConfig(data="d")
    with pytest.raises(ValueError, match="mode"):
        TrainConfig(model="m", data="d", mode="rlhf")


def test_cli_train_sft_from_toml(tok_dir, data_file, tmp_path):
    import tomllib  # noqa: F401  (the file below must parse as TOML)

    from mixr.cli import main
    out = tmp_path / "run"
    mc = tiny_hf()
    lines = [f'out_dir = "{out}"', f'tokenizer = "{tok_dir}"', f'data = "{data_file}"', "steps = 2", "batch_size = 4",
             "warmup_steps = 1", "save_every = 1", "progress = false", "[model_config]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in mc.items() if v is not None and not isinstance(v, dict)]
    cfg = tmp_path / "sft.toml"
    cfg.write_text("\n".join(lines) + "\n")
    main(["train", "sft", "--config", str(cfg)])
    assert [r["step"] for r in log_of(out)][-1] == 2
    assert (out / "checkpoint-000002" / "config.json").is_file()
    with pytest.raises(SystemExit):  # a config error is one line on stderr and exit 2
        main(["train", "sft", "--config", str(tmp_path / "missing.toml")])
