"""The decode path's small fused kernels (RMSNorm, residual add + RMSNorm, rotary q/k, router) and the model code
around them.

CPU: the references and the restructured model against the computations they replace.
TRITON_INTERPRET=1 (with triton importable): the Triton kernels on CPU tensors against the references, and one
engine decode step with them against the PyTorch path.
CUDA with Triton: the kernels against the references in bf16/fp16/fp32, under CUDA graphs, and in the engine.
"""

import dataclasses
import importlib
import os

import pytest
import torch

from mixr.kernels.norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from mixr.kernels.rope import apply_rope_qk, rope_ref
from mixr.kernels.router import can_fuse_route, route_ref
from mixr.layers.mla import MLAttention
from mixr.layers.moe import Router, RouterOptions
from mixr.layers.rotary import RotaryEmbedding
from mixr.models import config_from_hf

norm_mod = importlib.import_module("mixr.kernels.norm")
rope_mod = importlib.import_module("mixr.kernels.rope")
router_mod = importlib.import_module("mixr.kernels.router")
KERNEL_MODULES = (norm_mod, rope_mod, router_mod)

HAS_TRITON = all(m.HAS_TRITON for m in KERNEL_MODULES)
CUDA = torch.cuda.is_available() and HAS_TRITON
INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="needs triton and TRITON_INTERPRET=1")
# The interpreter rounds float32 -> bf16 by truncation (the GPU rounds to nearest), so its bf16 results may sit one
# bf16 ulp (2^-7 relative at most) from the reference per rounding step.
BF16_INTERPRETER_RTOL = 2 ** -5

# Every routing method the router kernel implements: (options, hidden size)
ROUTERS = {
    "v3_noaux_tc": dict(num_experts=16, top_k=3, scoring_func="sigmoid", topk_method="noaux_tc", n_group=4,
                        topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, correction_bias=True),
    "v3_full_size": dict(num_experts=256, top_k=8, scoring_func="sigmoid", topk_method="noaux_tc", n_group=8,
                         topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5, correction_bias=True),
    "v2_lite_greedy": dict(num_experts=64, top_k=6),
    "v2_group_limited": dict(num_experts=16, top_k=3, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                             routed_scaling_factor=16.0),
    "odd_groups": dict(num_experts=24, top_k=4, scoring_func="sigmoid", topk_method="noaux_tc", n_group=3,
                       topk_group=2, norm_topk_prob=True, correction_bias=True),
    "qwen_softmax_norm": dict(num_experts=60, top_k=4, norm_topk_prob=True),
    "top1_norm": dict(num_experts=8, top_k=1, norm_topk_prob=True),
}


def make_router(name: str, hidden: int = 96, device="cpu", dtype=torch.float32, seed=0) -> Router:
    """A router with random weights in `dtype` and its correction bias (if any) in float32, as checkpoints load."""
    g = torch.Generator().manual_seed(seed)
    r = Router(hidden, RouterOptions(**ROUTERS[name]))
    with torch.no_grad():
        r.weight.copy_(torch.randn(r.weight.shape, generator=g) * 2 / hidden ** 0.5)
        if r.opts.correction_bias:
            r.e_score_correction_bias.copy_(0.1 * torch.randn(r.opts.num_experts, generator=g))
    r = r.to(device)
    r.weight.data = r.weight.data.to(dtype)
    return r


def keep_bias_float32(r: Router) -> None:
    if r.opts.correction_bias:
        r.e_score_correction_bias.data = r.e_score_correction_bias.data.float()


def routing_margins(logits: torch.Tensor, bias: torch.Tensor | None, opts) -> torch.Tensor:
    """Per token, the smallest gap at a decision the router makes: between the last kept and the first dropped
    group, and between the k-th and (k+1)-th expert. Tokens with a tiny gap may legitimately route differently
    when the logits are summed in another order."""
    o = opts
    scores = logits.softmax(-1) if o.scoring_func == "softmax" else logits.sigmoid()
    choice = scores + bias if bias is not None else scores
    margin = torch.full((logits.shape[0],), float("inf"), device=logits.device)
    if o.topk_method != "greedy" and o.n_group > 1:
        grouped = choice.view(-1, o.n_group, o.num_experts // o.n_group)
        gs = grouped.topk(2, -1).values.sum(-1) if o.topk_method == "noaux_tc" else grouped.amax(-1)
        top = gs.topk(min(o.topk_group + 1, o.n_group), -1).values
        if top.shape[1] > o.topk_group:
            margin = top[:, o.topk_group - 1] - top[:, o.topk_group]
        keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(o.topk_group, -1).indices, True)
        fill = float("-inf") if o.topk_method == "noaux_tc" else 0.0
        choice = grouped.masked_fill(~keep[..., None], fill).view(-1, o.num_experts)
    if o.top_k < o.num_experts:
        top = choice.topk(o.top_k + 1, -1).values
        margin = torch.minimum(margin, (top[:, -2] - top[:, -1]).nan_to_num(float("inf")))
    return margin


def assert_same_routing(w, ids, w_ref, ids_ref, rtol=1e-5):
    """Same expert set per token, and the same weight on each expert (order within a token may differ)."""
    assert ids.dtype == ids_ref.dtype and w.dtype == w_ref.dtype == torch.float32
    i, order = ids.sort(-1)
    i_ref, order_ref = ids_ref.sort(-1)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(w.gather(1, order), w_ref.gather(1, order_ref), rtol=rtol, atol=1e-7)


# ------------------------------------------------------------------------------------------------ CPU
def old_rms_norm(x, weight, eps):
    """mixr's RMSNorm before the kernels, verbatim."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_refs_are_the_old_math(dtype):
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(3, 5, 40, generator=g).to(dtype) for _ in range(2))
    w = (1 + 0.3 * torch.randn(40, generator=g)).to(dtype)
    assert torch.equal(rms_norm(x, w, 1e-6), old_rms_norm(x, w, 1e-6))
    y, s = add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s, r + x) and torch.equal(y, old_rms_norm(r + x, w, 1e-6))
    out = torch.zeros(3, 5, 64, dtype=dtype)[..., 10:50]  # a strided destination
    rms_norm(x, w, 1e-6, out=out)
    assert torch.equal(out, old_rms_norm(x, w, 1e-6))


def old_hidden_states(model, ids):
    """The decoder as it was written before the residual was carried between sublayers."""
    dec = model.model
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    x = dec.embed_tokens(ids)
    rope = dec.rotary_emb(positions)
    for layer in dec.layers:
        x = x + layer.self_attn(layer.input_layernorm(x), positions, rope)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return dec.norm(x)


TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=256, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            moe_intermediate_size=24, first_k_dense_replace=1, n_shared_experts=2, num_experts_per_tok=3)
TINY_MODELS = {
    "deepseek_v3": dict(TINY, model_type="deepseek_v3", n_routed_experts=16, n_group=4, topk_group=2,
                        q_lora_rank=48, norm_topk_prob=True, routed_scaling_factor=2.5),
    "deepseek_v2": dict(TINY, model_type="deepseek_v2", n_routed_experts=8, topk_method="greedy",
                        q_lora_rank=None),
    "qwen3_moe": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=24,
                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, model_type="qwen3_moe",
                      max_position_embeddings=256),
}


def tiny_model(name: str, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    model = config_from_hf(dict(TINY_MODELS[name])).build()
    model.init_weights(std=0.15)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))  # not all ones, so a misplaced weight would show
        for r in (m for m in model.modules() if isinstance(m, Router) and m.opts.correction_bias):
            r.e_score_correction_bias.normal_(std=0.1)
    model = model.to(device=device, dtype=dtype)
    for r in (m for m in model.modules() if isinstance(m, Router)):
        keep_bias_float32(r)
    return model.eval()


@pytest.mark.parametrize("name", list(TINY_MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_carried_residual_changes_no_value(name, dtype):
    """Decoder/DecoderLayer carry (x, residual) so each add sits in the next norm: the values are the old ones,
    bit for bit, since the same additions and norms run in the same dtypes."""
    model = tiny_model(name, dtype)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.hidden_states(ids), old_hidden_states(model, ids))


def test_carried_residual_gradients_match():
    model = tiny_model("deepseek_v3")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    grads = []
    for fwd in (lambda: model.hidden_states(ids), lambda: old_hidden_states(model, ids)):
        model.zero_grad()
        fwd().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_qk_into_strided_views(interleaved):
    """MLA's use: rotate the rope slices of q and of the compressed kv row, straight into other buffers' slices."""
    g = torch.Generator().manual_seed(3)
    B, L, H, dn, dr, R = 2, 3, 4, 16, 8, 32
    q = torch.randn(B, L, H, dn + dr, generator=g)
    kv = torch.randn(B, L, R + dr, generator=g)
    cos, sin = RotaryEmbedding(dr, {"rope_type": "default", "rope_theta": 100.0}, 64)(
        torch.randint(0, 50, (B, L), generator=g))
    w = 1 + 0.3 * torch.randn(R, generator=g)
    q_out = torch.zeros(B, L, H, R + dr)
    k_out = torch.zeros(B, L, 1, R + dr)
    qr, _ = apply_rope_qk(q[..., dn:], kv[:, :, None, R:], cos, sin, interleaved,
                          q_out=q_out[..., R:], k_out=k_out[..., R:], norm=(kv[..., :R], w, 1e-6, k_out[:, :, 0, :R]))
    assert torch.equal(q_out[..., R:], rope_ref(q[..., dn:], cos, sin, interleaved))
    assert torch.equal(k_out[..., R:], rope_ref(kv[:, :, None, R:], cos, sin, interleaved))
    assert torch.equal(k_out[:, :, 0, :R], rms_norm_ref(kv[..., :R], w, 1e-6))  # the latent norm, same launch
    assert (q_out[..., :R] == 0).all()  # nothing written outside the slices
    # with the query's absorption q_nope @ W_UK written into the rest of q_out
    w_uk = torch.randn(H, dn, R, generator=g) / dn**0.5
    apply_rope_qk(q[..., dn:], None, cos, sin, interleaved, q_out=q_out[..., R:],
                  absorb=(q[..., :dn], w_uk, q_out[..., :R]))
    torch.testing.assert_close(q_out[..., :R], torch.einsum("blhd,hdr->blhr", q[..., :dn], w_uk), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="absorb"):
        apply_rope_qk(q[..., dn:], None, cos, sin, interleaved, absorb=(q[..., :dn], w_uk[1:], q_out[..., :R]))
    # the key and the latent scattered into the rows of a paged cache instead
    rows = torch.zeros(20, 1, R + dr)
    slots = torch.randperm(20, generator=g)[:B * L]
    apply_rope_qk(q[..., dn:], kv[:, :, None, R:], cos, sin, interleaved, q_out=q_out[..., R:],
                  k_out=rows[..., R:], out_slots=slots, norm=(kv[..., :R], w, 1e-6, rows[:, 0, :R]))
    assert torch.equal(rows[slots], k_out.reshape(B * L, 1, R + dr))
    assert (rows.sum((1, 2)) != 0).sum() == B * L  # nothing written to other rows
    with pytest.raises(ValueError, match="out_slots"):
        apply_rope_qk(q[..., dn:], kv[:, :, None, R:], cos, sin, interleaved, k_out=rows[..., R:], out_slots=slots[1:])
    # the rotation is a rotation: pairwise norms are kept
    pairs = q[..., dn:].reshape(B, L, H, dr // 2, 2) if interleaved else q[..., dn:].reshape(B, L, H, 2, dr // 2)
    n_in = pairs.pow(2).sum(-1 if interleaved else -2)
    n_out = qr[..., :dr // 2].pow(2) + qr[..., dr // 2:].pow(2)
    torch.testing.assert_close(n_out, n_in, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(ROUTERS))
def test_route_ref_is_router_forward(name):
    r = make_router(name)
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        w, ids, logits = r(x)
        w2, ids2, logits2 = route_ref(x, r.weight, getattr(r, "e_score_correction_bias", None), r.opts)
    assert torch.equal(ids, ids2) and torch.equal(w, w2) and torch.equal(logits, logits2)


def test_router_kernel_declines_what_it_does_not_implement():
    opts = RouterOptions(**ROUTERS["v3_noaux_tc"])
    assert router_mod._only_known_options(opts)
    # the dynamic expert count (another helper's option) and any future field with a non-default value
    fields = {f.name for f in dataclasses.fields(opts)}
    if "dynamic" in fields:
        assert not router_mod._only_known_options(dataclasses.replace(opts, dynamic="top_p", top_p=0.5))
    x = torch.randn(3, 96)
    assert not can_fuse_route(x, torch.randn(16, 96), opts)  # CPU


def test_absorbed_mla_matches_expanded():
    """MLA decode assembled in place (norm, rope and W_UK write their slices) against the expanded path."""
    from mixr.kv_cache import ContiguousCache

    torch.manual_seed(5)
    for q_lora, interleaved in ((None, True), (24, False)):
        mla = MLAttention(64, 4, q_lora, 32, 16, 8, 16, 0.2, rope_interleaved=interleaved)
        for p in mla.parameters():
            torch.nn.init.normal_(p, std=0.2)
        rot = RotaryEmbedding(8, {"rope_type": "default", "rope_theta": 100.0}, 64)
        B, P = 2, 6
        x = torch.randn(B, P + 1, 64)
        pos = torch.arange(P + 1).expand(B, P + 1)
        outs = []
        for decode in (False, True):
            cache = ContiguousCache(1, B, P + 1, [(1, 40)], torch.float32, "cpu")
            cache.length = P
            with torch.no_grad():
                mla(x[:, :P], pos[:, :P], rot(pos[:, :P]), cache.layer(0))
                cache.length, cache.decode = P + 1, decode
                outs.append(mla(x[:, P:], pos[:, P:], rot(pos[:, P:]), cache.layer(0)))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ interpreter
@needs_interpreter
@pytest.mark.parametrize("N", [64, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_kernels_interpreted(N, dtype):
    g = torch.Generator().manual_seed(N)
    x = torch.randn(6, N + 16, generator=g).to(dtype)[:, 8:8 + N]  # strided rows, as MLA's latent slice
    r = torch.randn(6, N, generator=g).to(dtype)
    w = (1 + 0.3 * torch.randn(N, generator=g)).to(dtype)
    out, r_out = torch.empty(6, N, dtype=dtype), torch.empty(6, N, dtype=dtype)
    rtol = 1e-6 if dtype == torch.float32 else BF16_INTERPRETER_RTOL
    norm_mod._launch_rms_norm(x, None, w, 1e-6, out, None)
    torch.testing.assert_close(out, rms_norm_ref(x, w, 1e-6), rtol=rtol, atol=1e-6)
    norm_mod._launch_rms_norm(x, r, w, 1e-6, out, r_out)
    y_ref, s_ref = add_rms_norm_ref(x, r, w, 1e-6)
    torch.testing.assert_close(r_out, s_ref, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(out, y_ref, rtol=rtol, atol=1e-6)


@needs_interpreter
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("Hq,Hk,D", [(4, 2, 16), (3, 1, 24), (16, 1, 64)])
def test_rope_kernel_interpreted(interleaved, Hq, Hk, D):
    g = torch.Generator().manual_seed(Hq + D)
    B, L = 2, 3
    q = torch.randn(B, L, Hq, D + 8, generator=g)[..., 8:]  # strided: the rope slice of each head
    k = torch.randn(B, L, Hk, D, generator=g)
    cos, sin = torch.randn(B, L, D // 2, generator=g), torch.randn(B, L, D // 2, generator=g)
    q_out = torch.zeros(B, L, Hq, D + 5)[..., 5:]
    k_out = torch.empty(B, L, Hk, D)
    rope_mod._launch_rope(q, k, cos, sin, interleaved, q_out, k_out)
    torch.testing.assert_close(q_out, rope_ref(q, cos, sin, interleaved), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_out, rope_ref(k, cos, sin, interleaved), rtol=1e-6, atol=1e-6)
    q_only = torch.empty(B, L, Hq, D)
    rope_mod._launch_rope(q, None, cos, sin, interleaved, q_only, None)
    torch.testing.assert_close(q_only, rope_ref(q, cos, sin, interleaved), rtol=1e-6, atol=1e-6)
    # MLA: the latent's RMSNorm in the same programs, strided rows in and out
    kv = torch.randn(B, L, 40 + 8, generator=g)
    latent = kv[..., :40]
    w = 1 + 0.3 * torch.randn(40, generator=g)
    normed = torch.zeros(B, L, 50)
    rope_mod._launch_rope(q, k, cos, sin, interleaved, q_out, k_out,
                          (kv.view(B * L, 48)[:, :40], w, 1e-6, normed.view(B * L, 50)[:, 10:]))
    torch.testing.assert_close(normed[..., 10:], rms_norm_ref(latent, w, 1e-6), rtol=1e-6, atol=1e-6)
    assert (normed[..., :10] == 0).all()
    torch.testing.assert_close(k_out, rope_ref(k, cos, sin, interleaved), rtol=1e-6, atol=1e-6)
    # the same, scattered into rows picked per token (a paged cache's slots)
    slots = torch.randperm(3 * B * L, generator=g)[:B * L]
    k_rows, n_rows = torch.zeros(3 * B * L, Hk, D), torch.zeros(3 * B * L, 40)
    rope_mod._launch_rope(q, k, cos, sin, interleaved, q_out, k_rows, (kv.view(B * L, 48)[:, :40], w, 1e-6, n_rows),
                          slots)
    torch.testing.assert_close(k_rows[slots], rope_ref(k, cos, sin, interleaved).reshape(B * L, Hk, D),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(n_rows[slots], rms_norm_ref(latent, w, 1e-6).reshape(B * L, 40), rtol=1e-6, atol=1e-6)
    untouched = torch.ones(3 * B * L, dtype=torch.bool)
    untouched[slots] = False
    assert (k_rows[untouched] == 0).all() and (n_rows[untouched] == 0).all()


@needs_interpreter
@pytest.mark.parametrize("B,L", [(1, 1), (2, 1), (1, 3)])
@pytest.mark.parametrize("Dn,R,block_r", [(16, 32, 16), (24, 40, 16)])
def test_rope_kernel_absorbs_query_interpreted(B, L, Dn, R, block_r):
    """MLA's q_nope @ W_UK run by extra programs of the rope launch (every token through each head's W_UK slice),
    with the rotations, the latent norm and the scatter into cache rows in the same launch."""
    g = torch.Generator().manual_seed(B * 10 + L + R)
    H, dr = 4, 8
    q = torch.randn(B, L, H, Dn + dr, generator=g)
    kv = torch.randn(B, L, 24 + dr, generator=g)
    cos, sin = torch.randn(B, L, dr // 2, generator=g), torch.randn(B, L, dr // 2, generator=g)
    w = torch.randn(H, Dn, R, generator=g) / Dn**0.5
    w_norm = 1 + 0.3 * torch.randn(24, generator=g)
    q_full = torch.zeros(B, L, H, R + dr)
    rows = torch.zeros(3 * B * L, 1, 24 + dr)
    slots = torch.randperm(3 * B * L, generator=g)[:B * L]
    rope_mod._launch_rope(q[..., Dn:], kv[:, :, None, 24:], cos, sin, True, q_full[..., R:], rows[..., 24:],
                          (kv.view(B * L, -1)[:, :24], w_norm, 1e-6, rows[:, 0, :24]), slots,
                          (q[..., :Dn], w, q_full[..., :R]), block_r)
    torch.testing.assert_close(q_full[..., :R], torch.einsum("blhd,hdr->blhr", q[..., :Dn], w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_full[..., R:], rope_ref(q[..., Dn:], cos, sin, True), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rows[slots, :, 24:], rope_ref(kv[:, :, None, 24:], cos, sin, True).reshape(B * L, 1, dr),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rows[slots, 0, :24], rms_norm_ref(kv[..., :24], w_norm, 1e-6).reshape(B * L, 24),
                               rtol=1e-6, atol=1e-6)


@needs_interpreter
@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("T", [1, 5])
def test_router_kernels_interpreted(name, T):
    r = make_router(name, seed=T)
    x = torch.randn(T, 96, generator=torch.Generator().manual_seed(1000 + T))
    bias = getattr(r, "e_score_correction_bias", None)
    with torch.no_grad():
        w_ref, ids_ref, logits_ref = r(x)
        logits = torch.empty(T, r.opts.num_experts)
        w = torch.empty(T, r.opts.top_k)
        ids = torch.empty(T, r.opts.top_k, dtype=torch.int64)
        arrivals = torch.zeros(T, dtype=torch.int32)
        router_mod._launch_router(x, r.weight, bias, r.opts, logits, w, ids, arrivals)  # the one-kernel path
        torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
        assert_same_routing(w, ids, w_ref, ids_ref)
        assert torch.equal(ids, ids_ref)  # descending choice order, as topk gives it (no ties in random inputs)
        assert (arrivals == 0).all()  # left zeroed for the next launch
        w2, ids2 = torch.empty_like(w), torch.empty_like(ids)
        router_mod._launch_router_select(logits_ref, bias, r.opts, w2, ids2)  # the prefill path's selection
    assert torch.equal(ids2, ids_ref)
    torch.testing.assert_close(w2, w_ref, rtol=1e-5, atol=1e-7)


def allow_cpu_kernels(monkeypatch):
    """Let the wrappers send CPU tensors to the (interpreted) Triton kernels."""
    for m in KERNEL_MODULES:
        monkeypatch.setattr(m, "_use_triton", lambda *ts: not (torch.is_grad_enabled()
                                                               and any(t.requires_grad for t in ts)))


def decode_logits(model, context: int = 21, batch: int = 2):
    """One engine decode step (what the CUDA graph captures) after a prefill, on a fresh paged cache."""
    from mixr.engine.model_runner import ModelRunner
    from mixr.engine.paged_cache import StepMeta
    from mixr.engine.sequence import Sequence
    from mixr.sampling import SamplingParams

    runner = ModelRunner(model, block_size=16, max_model_len=128, max_num_seqs=batch, max_num_batched_tokens=128,
                         kv_cache_bytes=8 << 20, cuda_graphs=False)
    g = torch.Generator().manual_seed(7)
    seqs = []
    for i in range(batch):
        s = Sequence(i, torch.randint(3, 128, (context + i,), generator=g).tolist(), SamplingParams())
        s.block_table = [4 * i + j for j in range(4)]
        seqs.append(s)
    with torch.inference_mode():
        runner.prefill(seqs, [len(s) for s in seqs])
        for s in seqs:
            s.num_computed_tokens = len(s.token_ids)
            s.token_ids.append(5)
        (ids, pos, slots), tables, lens = runner._decode_inputs(seqs, batch)
        return runner._decode_logits(ids, pos, StepMeta(True, slots, tables, lens))


@needs_interpreter
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_engine_decode_with_interpreted_kernels(name, monkeypatch):
    model = tiny_model(name)
    ref = decode_logits(model)
    allow_cpu_kernels(monkeypatch)
    calls = []
    for m, launcher in ((norm_mod, "_launch_rms_norm"), (rope_mod, "_launch_rope"), (router_mod, "_launch_router")):
        real = getattr(m, launcher)
        monkeypatch.setattr(m, launcher, lambda *a, _real=real, _n=launcher: calls.append(_n) or _real(*a))
    out = decode_logits(model)
    assert {"_launch_rms_norm", "_launch_rope", "_launch_router"} <= set(calls)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


# ------------------------------------------------------------------------------------------------ CUDA
def bf16_close(out, ref, dtype):
    """Within two roundings of the output dtype: the kernels sum in another order than PyTorch, which can move an
    intermediate rounding (the normalised row, before the weight multiply) by one ulp."""
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}[dtype]  # two ulps
    torch.testing.assert_close(out, ref, rtol=rtol, atol=rtol * 1e-2)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N", [512, 2048, 7168, 100])
def test_norm_kernels_cuda(dtype, N):
    g = torch.Generator().manual_seed(N)
    x = torch.randn(5, 3, N, generator=g).to("cuda", dtype)
    r = torch.randn(5, 3, N, generator=g).to("cuda", dtype)
    w = (1 + 0.3 * torch.randn(N, generator=g)).to("cuda", dtype)
    bf16_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), dtype)
    y, s = add_rms_norm(x, r, w, 1e-6)
    y_ref, s_ref = add_rms_norm_ref(x, r, w, 1e-6)
    assert torch.equal(s, s_ref)  # one rounding of one add: exact
    bf16_close(y, y_ref, dtype)
    if dtype != torch.float32:  # rounded to 8 or 11 bits, another summation order rarely shows
        mismatch = (y != y_ref).float().mean().item()
        assert mismatch < 0.01, f"{mismatch:.2%} of the outputs differ from PyTorch's"
    out = torch.zeros(5, 3, N + 64, dtype=dtype, device="cuda")  # strided in and out: MLA's latent
    rms_norm(x, w, 1e-6, out=out[..., 64:])
    bf16_close(out[..., 64:], rms_norm_ref(x, w, 1e-6), dtype)
    assert (out[..., :64] == 0).all()


@needs_cuda
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("Hq,Hk,D", [(16, 1, 64), (128, 1, 64), (32, 4, 128), (6, 2, 80)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_kernel_cuda(interleaved, Hq, Hk, D, dtype):
    g = torch.Generator().manual_seed(Hq)
    B, L = 3, 2
    q = torch.randn(B, L, Hq, 128 + D, generator=g).to("cuda", dtype)[..., 128:]
    k = torch.randn(B, L, Hk, D, generator=g).to("cuda", dtype)
    cos, sin = RotaryEmbedding(D, {"rope_type": "default", "rope_theta": 1e4}, 4096).cuda()(
        torch.randint(0, 4000, (B, L), generator=g).cuda())
    qr, kr = apply_rope_qk(q, k, cos, sin, interleaved)
    bf16_close(qr, rope_ref(q, cos, sin, interleaved), dtype)
    bf16_close(kr, rope_ref(k, cos, sin, interleaved), dtype)
    # with MLA's latent norm in the same launch, into a strided destination
    latent = torch.randn(B, L, 512 + 64, generator=g).to("cuda", dtype)[..., :512]
    w = (1 + 0.3 * torch.randn(512, generator=g)).to("cuda", dtype)
    row = torch.zeros(B, L, 1, 512 + D, dtype=dtype, device="cuda")
    apply_rope_qk(q, k[:, :, :1], cos, sin, interleaved, k_out=row[..., 512:], norm=(latent, w, 1e-6, row[:, :, 0, :512]))
    bf16_close(row[:, :, 0, :512], rms_norm_ref(latent, w, 1e-6), dtype)
    bf16_close(row[..., 512:], rope_ref(k[:, :, :1], cos, sin, interleaved), dtype)


@needs_cuda
@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("T", [1, 8, 64, 300])  # 300: the cuBLAS-logits path
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_router_kernels_cuda(name, T, dtype):
    r = make_router(name, hidden=2048, device="cuda", dtype=dtype, seed=T)
    # (not the router's seed: x equal to a weight row would make one logit huge and the rest tie at ~0)
    x = torch.randn(T, 2048, generator=torch.Generator().manual_seed(1000 + T)).to("cuda", dtype)
    with torch.no_grad():
        assert can_fuse_route(x, r.weight, r.opts)
        w, ids, logits = r(x)  # the dispatch in Router.forward
        w_ref, ids_ref, logits_ref = route_ref(x, r.weight, getattr(r, "e_score_correction_bias", None), r.opts)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)
    # Random inputs rarely, but at 300 tokens x 256 experts not never, put two choices within the float32
    # rounding of the logits of each other: compare the tokens whose every decision has a clear margin.
    clear = routing_margins(logits_ref, getattr(r, "e_score_correction_bias", None), r.opts) > 1e-6
    assert clear.float().mean() > 0.8
    assert_same_routing(w[clear], ids[clear], w_ref[clear], ids_ref[clear], rtol=1e-4)


@needs_cuda
def test_router_declines_dynamic_and_grad():
    r = make_router("v3_noaux_tc", device="cuda")
    x = torch.randn(4, 96, device="cuda")
    if "dynamic" in {f.name for f in dataclasses.fields(r.opts)}:
        assert not can_fuse_route(x, r.weight, dataclasses.replace(r.opts, dynamic="top_p", top_p=0.5))
    assert not can_fuse_route(x, r.weight, r.opts)  # r.weight requires grad and grad mode is on
    with torch.no_grad():
        assert can_fuse_route(x, r.weight, r.opts)


@needs_cuda
def test_kernels_under_cuda_graph():
    dev, dt = "cuda", torch.bfloat16
    r = make_router("v3_full_size", hidden=512, device=dev, dtype=dt)
    x = torch.randn(4, 512, device=dev, dtype=dt)
    res = torch.randn(4, 512, device=dev, dtype=dt)
    w = 1 + 0.3 * torch.randn(512, device=dev, dtype=dt)
    q = torch.randn(4, 1, 16, 64, device=dev, dtype=dt)
    cos, sin = torch.randn(4, 1, 32, device=dev), torch.randn(4, 1, 32, device=dev)

    def step():
        y, s = add_rms_norm(x, res, w, 1e-6)
        return y, s, apply_rope_qk(q, q[:, :, :1], cos, sin, True)[0], r(y)

    with torch.no_grad():
        step()  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = step()
        for t in (x, res, q, cos, sin):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        y_ref, s_ref = add_rms_norm_ref(x, res, w, 1e-6)
        bf16_close(outs[0], y_ref, dt)
        assert torch.equal(outs[1], s_ref)
        bf16_close(outs[2], rope_ref(q, cos, sin, True), dt)
        w_ref, ids_ref, _ = route_ref(outs[0], r.weight, r.e_score_correction_bias, r.opts)
        assert_same_routing(outs[3][0], outs[3][1], w_ref, ids_ref, rtol=1e-4)


@needs_cuda
@pytest.mark.parametrize("name", list(TINY_MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_decode_fused_matches_pytorch_path_cuda(name, dtype, monkeypatch):
    model = tiny_model(name, dtype, "cuda")
    fused = decode_logits(model)
    for m in KERNEL_MODULES:
        monkeypatch.setattr(m, "_use_triton", lambda *ts: False)
    ref = decode_logits(model)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fused.float(), ref.float(), rtol=tol, atol=tol)
