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
