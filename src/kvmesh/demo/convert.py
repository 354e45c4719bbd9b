"""Turning the shipped GGUF into a Hugging Face checkpoint, and checking one: the part that needs transformers.

``model.py`` decides when to build (markers, locks, the atomic swap into place) and imports this module
only when it does, so ``kvmesh model path`` and the engines never import transformers for it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kvmesh.demo.model import (
    _INSTALL_DEMO_DEPS,
    _REBUILD,
    _REINSTALL_PACKAGE,
    _REQUIRED_FILES,
    CHECK_EXPECTED,
    CHECK_NEW_TOKENS,
    CHECK_PROMPT,
    DEMO_MODEL_NAME,
    DemoModelError,
    Progress,
)


def check_demo_model(path: Path) -> str:
    """Load the HF checkpoint at ``path`` and greedy-decode a few tokens of a known prompt.

    Returns the generated text (without the prompt).  Raises
    :class:`DemoModelError` if the checkpoint cannot be loaded or the text does
    not mention Paris.
    """
    path = Path(path).expanduser()
    missing = [name for name in _REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise DemoModelError(
            f"No complete demo checkpoint in {path} (missing {', '.join(missing)}). "
            f"Rebuild it with: {_REBUILD}")
    transformers, torch = import_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, output_loading_info=True)
    except Exception as e:
        raise DemoModelError(
            f"The demo checkpoint in {path} cannot be loaded ({type(e).__name__}: {e}). "
            f"Rebuild it with: {_REBUILD}") from e
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise DemoModelError(
            f"The demo checkpoint in {path} lacks weights "
            f"(missing {sorted(info.get('missing_keys') or [])[:5]}, "
            f"mismatched {list(info.get('mismatched_keys') or [])[:5]}). Rebuild it with: {_REBUILD}")
    model = model.float().eval()  # bf16 weights, fp32 compute: the same answer on any CPU
    inputs = tokenizer(CHECK_PROMPT, return_tensors="pt")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=CHECK_NEW_TOKENS, do_sample=False, pad_token_id=pad_id)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    if CHECK_EXPECTED not in text:
        raise DemoModelError(
            f"The demo checkpoint in {path} answered {CHECK_PROMPT!r} with {text!r}, "
            f"not {CHECK_EXPECTED!r}; its weights are damaged. Rebuild it with: {_REBUILD}")
    return text


def import_transformers() -> tuple[Any, Any]:
    """Import transformers and torch lazily, offline; explain how to install them if missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import torch
        import transformers
    except ImportError as e:
        raise DemoModelError(
            f"The demo model needs transformers, gguf and accelerate ({e}). Run: {_INSTALL_DEMO_DEPS}"
        ) from e
    return transformers, torch


def build_checkpoint(gguf: Path, out: Path, say: Progress) -> None:
    """De-quantize ``gguf`` and save a bfloat16 HF checkpoint with its tokenizer into ``out``."""
    transformers, torch = import_transformers()
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = {"gguf_file": gguf.name, "local_files_only": True}
    say(f"Loading the tokenizer from {gguf}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    say(f"Loading and de-quantizing {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB)")
    src = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kw)

    cfg_dict = src.config.to_dict()
    if cfg_dict.get("model_type") != "llama":
        raise DemoModelError(
            f"{gguf} holds a {cfg_dict.get('model_type')!r} model, not llama. "
            f"Reinstall the package: {_REINSTALL_PACKAGE}")
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path",
                "transformers_version", "torch_dtype", "dtype"):
        cfg_dict.pop(key, None)
    state = src.state_dict()
    embed = state["model.embed_tokens.weight"]
    lm_head = state.get("lm_head.weight")
    tied = bool(cfg_dict.get("tie_word_embeddings", False))
    if tied and lm_head is not None and not torch.equal(lm_head, embed):
        say("The GGUF has a separate output matrix: writing an untied lm_head")
        tied = False
    if not tied and lm_head is None:
        say("The GGUF has no output matrix: tying lm_head to the embeddings")
        tied = True
    cfg_dict["tie_word_embeddings"] = tied
    cfg_dict["architectures"] = ["LlamaForCausalLM"]
    config = LlamaConfig(**cfg_dict)

    say("Copying the weights into a fresh LlamaForCausalLM (bfloat16)")
    model = LlamaForCausalLM(config)
    if tied:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise DemoModelError(
            f"The weights in {gguf} do not fit LlamaForCausalLM (missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}). Reinstall the package: {_REINSTALL_PACKAGE}")
    if tied:
        model.tie_weights()
        if not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight):
            raise DemoModelError("lm_head is not tied to embed_tokens after loading; "
                                 f"run: {_REBUILD}")
    del src, state
    model = model.to(torch.bfloat16).eval()

    say(f"Writing the checkpoint ({DEMO_MODEL_NAME}, safetensors)")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _fix_config_json(out / "config.json")
    _fix_tokenizer_config(out, tokenizer, int(cfg_dict.get("max_position_embeddings") or 0))
    missing_files = [n for n in _REQUIRED_FILES if not (out / n).is_file()]
    if missing_files:
        raise DemoModelError(f"save_pretrained wrote no {', '.join(missing_files)} in {out}; "
                             f"run: {_REBUILD}")


def _fix_config_json(path: Path) -> None:
    """Make config.json say bfloat16 under both key names and keep older readers' rope key."""
    data = json.loads(path.read_text())
    data.pop("quantization_config", None)
    data["dtype"] = "bfloat16"
    data["torch_dtype"] = "bfloat16"
    rope = data.get("rope_parameters") or {}
    if "rope_theta" not in data and isinstance(rope, dict) and "rope_theta" in rope:
        data["rope_theta"] = rope["rope_theta"]  # transformers < 5 and older vLLM read this
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _fix_tokenizer_config(out: Path, tokenizer: Any, max_len: int) -> None:
    """Drop load-time keys, use a class name every transformers knows, keep the chat template."""
    path = out / "tokenizer_config.json"
    data = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "gguf_file", "name_or_path"):
        data.pop(key, None)
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    if max_len > 0:
        data["model_max_length"] = max_len
    template = getattr(tokenizer, "chat_template", None)
    if template:
        # Both in tokenizer_config.json (older readers) and chat_template.jinja (newer ones).
        data["chat_template"] = template
        jinja = out / "chat_template.jinja"
        if not jinja.exists():
            jinja.write_text(template)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
