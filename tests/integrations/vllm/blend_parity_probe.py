"""Run by test_vllm_blend.py in a process of its own: vLLM's blend path against the transformers reference.

vLLM-CPU loads the demo model through kvmesh's load format in this process (no engine-core or worker
processes), so its model is at hand; both blend the same prompt from the same stored passages with the same
settings, in fp32.  Prints one JSON line: per rule, the largest K/V difference and whether they chose the
same tokens to recompute.
"""

from __future__ import annotations

import json
import os
import sys

import torch

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def main(model_path: str) -> None:
    from transformers import AutoModelForCausalLM
    from vllm import LLM

    from kvmesh.blend.compute import BlendSettings, Passage, blend_kv
    from kvmesh.blend.reference import TransformersLayers, passage_kv
    from kvmesh.integrations.vllm.blend_model import VLLMLayers, engine_model

    llm = LLM(model_path, load_format="kvmesh", distributed_executor_backend="uni", enforce_eager=True, dtype="float32",
              max_model_len=512, enable_prefix_caching=False, kv_cache_memory_bytes=64 * 1024 * 1024)
    engine = VLLMLayers(engine_model())  # the loader keeps a weak reference: ``llm`` holds the model
    reference_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                           local_files_only=True).eval()
    reference = TransformersLayers(reference_model)
    tokens = torch.randint(100, 40000, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    passages = [Passage(start, start + 50, passage_kv(reference_model, tokens[start:start + 50]))
                for start in (40, 100, 150)]
    prefix = passage_kv(reference_model, tokens[:32])
    report = {}
    for rule, fraction in (("none", 0.0), ("kvmesh", 0.15), ("cacheblend", 1.0)):
        ours = blend_kv(engine, tokens, passages, BlendSettings(rule, fraction), prefix)
        oracle = blend_kv(reference, tokens, passages, BlendSettings(rule, fraction), prefix)
        report[rule] = {"max_diff": float((ours.kv - oracle.kv).abs().max()),
                        "same_selection": ours.recomputed.tolist() == oracle.recomputed.tolist(),
                        "recomputed": len(ours.recomputed)}
    full = passage_kv(reference_model, tokens)
    everything = blend_kv(engine, tokens, passages, BlendSettings("cacheblend", 1.0), prefix)
    report["full_prefill_diff"] = float((everything.kv - full).abs().max())
    print(json.dumps(report))
    del llm


if __name__ == "__main__":
    main(sys.argv[1])
