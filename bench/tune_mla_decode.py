"""GPU: tune the two fused kernels of absorbed MLA decode on DeepSeek-V2-Lite's shape (16 heads, latent 512, q_nope
and v_head_dim 128, rope 64), at batch 1, 2, 4 and 8, timed inside CUDA graphs, every candidate first checked
against the unfused path:
  proj    the attention's split merge with W_UV in one kernel (mixr.kernels.attention.PROJ_CONFIG), against the
          merge kernel then one bmm: attention over a paged cache plus the projection, per candidate tile;
  absorb  q_nope @ W_UK in extra programs of the rope launch (mixr.kernels.rope.ABSORB_CONFIG), against the rope
          launch then one bmm, per BLOCK_R.
Prints JSON (and writes it to --out); copy the best tiles and the batch where fusing stops paying into the configs.

    PYTHONPATH=. python bench/tune_mla_decode.py --out $OUT/mla_decode.json
"""

import argparse
import itertools

import torch
from report import emit

from mixr.kernels import attention as A
from mixr.kernels import rope as P
from mixr.kernels.timing import graph_ms

H, R, DR, DN, DV, PAGE = 16, 512, 64, 128, 128, 16
SHAPES = ((1, 384), (1, 2048), (2, 384), (4, 384), (8, 512))  # (batch, context)


def paged_case(B: int, ctx: int, gen: torch.Generator):
    blocks = B * (ctx // PAGE + 1)
    cache = (torch.randn(blocks + 1, PAGE, 1, R + DR, generator=gen) / 4).to("cuda", torch.bfloat16)
    tables = torch.randperm(blocks, generator=gen)[:B * (ctx // PAGE + 1)].view(B, -1).to("cuda", torch.int32)
    q = torch.randn(B, H, R + DR, generator=gen).to("cuda", torch.bfloat16)
    lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    w_uv = (torch.randn(H, R, DV, generator=gen) / R ** 0.5).to("cuda", torch.bfloat16).transpose(1, 2)  # strided
    return q, cache, cache[..., :R], tables, lens, w_uv


def tune_absorb(gen: torch.Generator) -> dict:
    out = {"default": P.ABSORB_CONFIG, "shapes": {}}
    for T in (1, 2, 4, 8):
        q = torch.randn(T, 1, H, DN + DR, generator=gen).to("cuda", torch.bfloat16)
        kv = torch.randn(T, 1, R + DR, generator=gen).to("cuda", torch.bfloat16)
        cos, sin = (torch.randn(T, 1, DR // 2, generator=gen).cuda() for _ in range(2))
        w_uk = (torch.randn(H, DN, R, generator=gen) / DN ** 0.5).to("cuda", torch.bfloat16)
        norm_w = torch.ones(R, device="cuda", dtype=torch.bfloat16)
        q_full = torch.empty(T, 1, H, R + DR, device="cuda", dtype=torch.bfloat16)
        rows = torch.empty(4 * T, 1, R + DR, device="cuda", dtype=torch.bfloat16)
        slots = torch.randperm(4 * T, generator=gen)[:T].cuda()

        def call(absorb, block_r=None):
            norm = (kv.view(T, -1)[:, :R], norm_w, 1e-6, rows[:, 0, :R])
            if not absorb:
                return lambda: (P._launch_rope(q[..., DN:], kv[:, :, None, R:], cos, sin, True, q_full[..., R:],
                                               rows[..., R:], norm, slots),
                                P._absorb_bmm(q[..., :DN], w_uk, q_full[..., :R]))
            return lambda: P._launch_rope(q[..., DN:], kv[:, :, None, R:], cos, sin, True, q_full[..., R:],
                                          rows[..., R:], norm, slots, (q[..., :DN], w_uk, q_full[..., :R]), block_r)

        call(False)()
        ref = q_full.float().clone()
        row = {"unfused_us": graph_ms([call(False)]) * 1e3, "fused_us": {}}
        for block_r in (16, 32, 64, 128):
            q_full.zero_()
            call(True, block_r)()
            err = ((q_full.float() - ref).norm() / ref.norm()).item()
            row["fused_us"][f"BLOCK_R={block_r}"] = ([round(graph_ms([call(True, block_r)]) * 1e3, 2), round(err, 5)]
                                                     if err < 1e-2 else [None, err])
        out["shapes"][f"T{T}"] = row
        print(f"absorb T={T}: unfused {row['unfused_us']:.2f} us, fused {row['fused_us']}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "absorb": tune_absorb(gen)}
    grid = [dict(BLOCK_P=p, BLOCK_D=d, BLOCK_S=s, num_warps=w)
            for p, d, s, w in itertools.product((16, 32, 64), (64, 128, 256), (8, 16), (2, 4))]
    result["proj"] = {"default": A.PROJ_CONFIG, "shapes": {}}
    for B, ctx in SHAPES:
        q, kc, vc, bt, lens, w = paged_case(B, ctx, gen)

        def call(max_batch, tile=None):
            cfg = dict(A.PROJ_CONFIG, **(tile or {}), max_batch=max_batch)
            return lambda: A.paged_decode_attention(q, kc, vc, bt, lens, 0.1, v_proj=w, proj_config=cfg)

        ref = call(0)().float()
        row = {"unfused_us": graph_ms([call(0)]) * 1e3,
               "attention_and_merge_only_us": graph_ms([lambda: A.paged_decode_attention(q, kc, vc, bt, lens, 0.1)]) * 1e3,
               "fused_us": {}}
        for tile in grid:
            out = call(B, tile)().float()
            err = ((out - ref).norm() / ref.norm()).item()
            key = "p{BLOCK_P}_d{BLOCK_D}_s{BLOCK_S}_w{num_warps}".format(**tile)
            row["fused_us"][key] = [round(graph_ms([call(B, tile)]) * 1e3, 2), round(err, 5)] if err < 1e-2 else [None, err]
        timed = {k: v[0] for k, v in row["fused_us"].items() if v[0] is not None}
        row["best"] = min(timed, key=timed.get)
        result["proj"]["shapes"][f"B{B}_ctx{ctx}"] = row
        print(f"B={B} ctx={ctx}: unfused {row['unfused_us']:.2f} us, fused best {timed[row['best']]:.2f} us "
              f"({row['best']})", flush=True)
    emit(result, args.out)


if __name__ == "__main__":
    main()
