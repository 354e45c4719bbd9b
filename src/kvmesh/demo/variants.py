"""Checkpoints derived from the demo model, built locally (nothing is downloaded): other shapes to test on.

The demo model has 9 attention heads in 3 KV groups, which two tensor-parallel workers cannot split.
``fewer_heads`` keeps the first KV groups and their query heads (and the output projection's columns that
read them), so the model still answers in words, with a head count that divides.  Its weights differ
from the demo model's, so its fingerprint does too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def fewer_heads(source: Path, target: Path, kv_heads: int) -> Path:
    """The checkpoint at ``source`` with only its first ``kv_heads`` KV groups, written to ``target``.

    Idempotent: a finished ``target`` (its ``config.json`` is written last) is left as it is.
    """
    import torch
    from safetensors.torch import load_file, save_file

    if (target / "config.json").exists():
        return target
    config = json.loads((source / "config.json").read_text())
    groups, heads = config["num_key_value_heads"], config["num_attention_heads"]
    if not 0 < kv_heads <= groups:
        raise ValueError(f"kv_heads must be between 1 and {groups}, got {kv_heads}")
    per_group = heads // groups
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    q_rows, kv_rows = kv_heads * per_group * head_dim, kv_heads * head_dim
    tensors = load_file(str(source / "model.safetensors"))
    kept: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith("self_attn.q_proj.weight"):
            tensor = tensor[:q_rows]
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            tensor = tensor[:kv_rows]
        elif name.endswith("self_attn.o_proj.weight"):
            tensor = tensor[:, :q_rows]
        kept[name] = tensor.contiguous()
    target.mkdir(parents=True, exist_ok=True)
    save_file(kept, str(target / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)
    config.update(num_attention_heads=kv_heads * per_group, num_key_value_heads=kv_heads, head_dim=head_dim)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


# Tiny random-weight checkpoints, one per attention family: seeded, built from transformers' config classes,
# with the demo model's tokenizer (vocabulary 49152).  Their answers are words at random, but they are the
# same words every time, which is what an exactness test compares.
_COMMON: dict[str, Any] = {"vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
           "max_position_embeddings": 4096, "hidden_size": 256, "intermediate_size": 512,
           "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}


def _family_config(family: str) -> Any:
    import transformers as hf

    if family == "qwen2":
        return hf.Qwen2Config(**_COMMON)
    if family == "qwen3":  # QK-norm
        return hf.Qwen3Config(**_COMMON, head_dim=64)
    if family == "mistral-sliding-window":  # a window of 128 tokens, gpt-oss's: half a kvmesh chunk
        return hf.MistralConfig(**_COMMON, head_dim=64, sliding_window=128)
    if family == "mixtral-moe":
        return hf.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2)
    if family == "deepseek-v2-mla":
        return hf.DeepseekV2Config(**{**_COMMON, "num_key_value_heads": 4}, kv_lora_rank=512, q_lora_rank=None,
                                   qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,
                                   first_k_dense_replace=4, n_routed_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=128)
    if family == "nemotron-h-hybrid":  # Mamba2 layers beside attention (fp32 only on vLLM-CPU)
        return hf.NemotronHConfig(
            vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2, max_position_embeddings=4096,
            tie_word_embeddings=False, hidden_size=128, intermediate_size=256,
            layers_block_type=["mamba", "mlp", "attention", "mlp"], num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=32, n_groups=1, conv_kernel=4,
            expand=2, chunk_size=64, architectures=["NemotronHForCausalLM"])
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES + HYBRID_FAMILIES)}")


FAMILIES = ("qwen2", "qwen3", "mistral-sliding-window", "mixtral-moe", "deepseek-v2-mla")  # kvmesh serves these
HYBRID_FAMILIES = ("nemotron-h-hybrid",)  # recurrent state beside attention (fp32 only on vLLM-CPU)


def tiny_checkpoint(family: str, source: Path, target: Path, seed: int = 0) -> Path:
    """A tiny random-weight ``family`` checkpoint in ``target``, with ``source``'s (the demo model's) tokenizer.

    Idempotent like :func:`fewer_heads`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if (target / "config.json").exists():
        return target
    config = _family_config(family)
    torch.manual_seed(seed)
    dtype = torch.float32 if family in HYBRID_FAMILIES else torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    staging = target.with_name(target.name + ".partial")
    model.save_pretrained(staging, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (source / name).exists() and name != "generation_config.json":
            shutil.copy2(source / name, staging / name)
    staging.rename(target)
    return target
