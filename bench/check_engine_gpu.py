"""GPU correctness check: the engine (CUDA graphs, Triton fused MoE, paged decode attention, absorbed MLA) against
the reference path (contiguous cache, expanded MLA, SDPA) on tiny random checkpoints, greedy, in float32 and bf16.

    PYTHONPATH=.:tests python bench/check_engine_gpu.py --out check.json
"""

import argparse
import tempfile
from pathlib import Path

import torch

from conftest import FAMILIES, VOCAB, make_hf_checkpoint
from report import emit

from mixr import LLM, SamplingParams
from mixr.reference import reference_generate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--families", default="deepseek_v3_noaux_tc,deepseek_v2_greedy,qwen3_moe,mixtral")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 37, 12, 80, 3, 21, 64, 9)]
    result = {"device": torch.cuda.get_device_name(), "families": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.families.split(","):
            path = make_hf_checkpoint(Path(tmp) / name, *FAMILIES[name])
            for dtype in ("float32", "bfloat16"):
                llm = LLM(path, device="cuda", dtype=dtype, block_size=16, max_num_seqs=8)
                ref = reference_generate(llm.model, prompts, 32)
                got = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32,
                                                                                 ignore_eos=True))]
                same = sum(a == b for r, o in zip(ref, got) for a, b in zip(r, o))
                prefix = [next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), len(r)) for r, o in zip(ref, got)]
                result["families"][f"{name}/{dtype}"] = {
                    "token_agreement": same / sum(map(len, ref)), "identical_sequences": sum(r == o for r, o in zip(ref, got)),
                    "sequences": len(ref), "first_divergence": prefix, "graphs": len(llm.engine.runner.graphs)}
                if name.startswith("deepseek"):
                    # the same comparison inside the reference path alone: absorbed vs expanded MLA decode
                    absorbed = reference_generate(llm.model, prompts, 32, absorbed_decode=True)
                    result["families"][f"{name}/{dtype}"]["reference_absorbed_vs_expanded_agreement"] = sum(
                        a == b for r, o in zip(ref, absorbed) for a, b in zip(r, o)) / sum(map(len, ref))
                    result["families"][f"{name}/{dtype}"]["engine_vs_reference_absorbed_agreement"] = sum(
                        a == b for r, o in zip(absorbed, got) for a, b in zip(r, o)) / sum(map(len, ref))
                print(name, dtype, result["families"][f"{name}/{dtype}"], flush=True)
                del llm
                torch.cuda.empty_cache()
    emit(result, args.out)


if __name__ == "__main__":
    main()
