"""kvmesh.fingerprint: the model identity follows the weights, config and tokenizer, not the folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from kvmesh import fingerprint as fp
from kvmesh.fingerprint import (
    DigestCache,
    FingerprintError,
    lora_fingerprint,
    model_fingerprint,
    resolve_model_dir,
    sample_offsets,
)

CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4,
    "rope_theta": 10000.0, "max_position_embeddings": 64, "torch_dtype": "float32",
    "transformers_version": "4.46.0", "vocab_size": 32,
}
TOKENIZER = {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}}
TOKENIZER_CONFIG = {"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
                    "eos_token": "b", "name_or_path": "/somewhere/else"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's default digest cache is its own file, never ~/.cache."""
    path = tmp_path / "cache" / "fingerprints.json"
    monkeypatch.setenv(fp.CACHE_ENV, str(path))
    return path


def tensors(delta: float = 0.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weights = {
        "model.embed_tokens.weight": torch.randn(32, 16, generator=generator),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=generator),
        "model.norm.weight": torch.ones(16),
    }
    weights["model.layers.0.self_attn.q_proj.weight"][3, 5] += delta
    return weights


def make_model(path: Path, *, delta: float = 0.0, config: dict[str, Any] | None = None,
               tokenizer_config: dict[str, Any] | None = None) -> Path:
    path.mkdir(parents=True)
    save_file(tensors(delta), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(CONFIG | (config or {})))
    (path / "tokenizer.json").write_text(json.dumps(TOKENIZER))
    (path / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG | (tokenizer_config or {})))
    return path


def ident(path: Path, dtype: str = "bfloat16", **kwargs: Any) -> fp.ModelIdentity:
    return model_fingerprint(path, dtype=dtype, **kwargs)


def test_one_weight_value_in_same_named_folders_gives_different_fingerprints(tmp_path: Path) -> None:
    a = make_model(tmp_path / "a" / "Model")
    b = make_model(tmp_path / "b" / "Model", delta=1e-3)
    ia, ib = ident(a), ident(b)
    assert ia.digest != ib.digest
    assert ia.weights != ib.weights
    assert (ia.config, ia.tokenizer) == (ib.config, ib.tokenizer)
    assert ident(a, content="full").digest != ident(b, content="full").digest


def test_a_copy_at_another_path_has_the_same_fingerprint(tmp_path: Path) -> None:
    original = make_model(tmp_path / "a" / "Model")
    copy = tmp_path / "elsewhere" / "Renamed"
    shutil.copytree(original, copy)
    assert ident(original) == ident(copy)
    assert ident(original, use_cache=False) == ident(copy, use_cache=False)


def test_chat_template_is_part_of_the_identity(tmp_path: Path) -> None:
    base = ident(make_model(tmp_path / "a"))
    changed = make_model(tmp_path / "b", tokenizer_config={"chat_template": "{{ messages[0].content }}"})
    assert ident(changed).tokenizer != base.tokenizer
    assert ident(changed).digest != base.digest
    before = ident(changed)
    (changed / "chat_template.jinja").write_text("{{ 'x' }}")
    with_file = ident(changed)
    assert with_file.digest != before.digest
    assert with_file.weights == base.weights


def test_the_tokenizer_vocabulary_is_part_of_the_identity(tmp_path: Path) -> None:
    a, b = make_model(tmp_path / "a"), make_model(tmp_path / "b")
    (b / "tokenizer.json").write_text(json.dumps(TOKENIZER | {"model": {"type": "BPE", "vocab": {"a": 1, "b": 0}}}))
    assert ident(a).digest != ident(b).digest


def test_rope_theta_changes_the_fingerprint(tmp_path: Path) -> None:
    base = ident(make_model(tmp_path / "a"))
    other = ident(make_model(tmp_path / "b", config={"rope_theta": 500000.0}))
    assert other.config != base.config
    assert other.digest != base.digest
    assert other.weights == base.weights


def test_dtype_changes_the_fingerprint_and_its_spellings_do_not(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    assert ident(model, "bfloat16").digest != ident(model, "float16").digest
    assert ident(model, "bfloat16") == ident(model, "bf16") == ident(model, str(torch.bfloat16))
    with pytest.raises(FingerprintError, match="auto"):
        ident(model, "auto")


def test_fields_no_engine_reads_do_not_change_the_fingerprint(tmp_path: Path) -> None:
    base = ident(make_model(tmp_path / "a"))
    tooling = ident(make_model(tmp_path / "b", config={"transformers_version": "5.19.0",
                                                       "_name_or_path": "/home/someone/model"},
                               tokenizer_config={"name_or_path": "other/path"}))
    assert tooling == base
    # transformers >= 4.56 writes "dtype" where older versions wrote "torch_dtype"
    renamed = {k: v for k, v in CONFIG.items() if k != "torch_dtype"} | {"dtype": "float32"}
    newer = make_model(tmp_path / "c")
    (newer / "config.json").write_text(json.dumps(renamed))
    assert ident(newer).config == base.config


def test_safetensors_header_is_hashed_even_when_the_bytes_are_equal(tmp_path: Path) -> None:
    a = make_model(tmp_path / "a")
    b = make_model(tmp_path / "b")
    reshaped = tensors()
    name = "model.layers.0.self_attn.q_proj.weight"
    reshaped[name] = reshaped[name].reshape(8, 32)
    save_file(reshaped, str(b / "model.safetensors"))
    assert (a / "model.safetensors").stat().st_size == (b / "model.safetensors").stat().st_size
    assert ident(a).weights != ident(b).weights


def test_cached_call_reads_no_weight_content(tmp_path: Path, private_cache: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(tmp_path / "m")
    weights = model / "model.safetensors"
    first = ident(model)
    entries = json.loads(private_cache.read_text())["files"]
    assert str(weights.resolve()) in entries

    def no_reading(*args: object, **kwargs: object) -> str:
        raise AssertionError("weight content was read although the digest was cached")

    with monkeypatch.context() as patch:
        patch.setattr(fp, "_weight_file_digest", no_reading)
        assert ident(model) == first

    # Edited in place (same size, same inode) with its mtime put back: the cache answers, so the
    # old digest comes back, which only happens if the content is not read.
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # last byte of the last tensor: within the sampled bytes
    with open(weights, "r+b") as f:
        f.write(data)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert ident(model) == first
    edited = ident(model, use_cache=False)
    assert edited != first

    # The same rewrite with a new mtime is noticed and re-hashed.
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert ident(model) == edited


def test_corrupt_cache_is_ignored_and_rewritten(tmp_path: Path, private_cache: Path) -> None:
    model = make_model(tmp_path / "m")
    expected = ident(model, use_cache=False)
    for junk in (b"\x00not json{", b'{"format": 1, "files": {"x": 3}}', b"[1, 2]"):
        private_cache.parent.mkdir(parents=True, exist_ok=True)
        private_cache.write_bytes(junk)
        assert ident(model) == expected
        saved = json.loads(private_cache.read_text())
        assert str((model / "model.safetensors").resolve()) in saved["files"]


def test_a_wrong_cached_digest_for_a_stale_stat_is_not_used(tmp_path: Path, private_cache: Path) -> None:
    model = make_model(tmp_path / "m")
    expected = ident(model)
    saved = json.loads(private_cache.read_text())
    for entry in saved["files"].values():
        entry["stat"][0] += 1  # a size the file does not have
        entry["digests"] = {kind: "0" * 32 for kind in entry["digests"]}
    private_cache.write_text(json.dumps(saved))
    assert ident(model) == expected


def test_cache_path_argument_and_env(tmp_path: Path, private_cache: Path) -> None:
    model = make_model(tmp_path / "m")
    explicit = tmp_path / "explicit" / "c.json"
    ident(model, cache_path=explicit)
    assert explicit.is_file() and not private_cache.exists()
    ident(model)
    assert private_cache.is_file()
    assert not list(private_cache.parent.glob("*.tmp"))


def test_sampled_digest_reads_each_large_tensors_ends_and_misses_what_lies_between(tmp_path: Path) -> None:
    """The limit the docstring states: a change between sampled blocks of a large tensor is missed."""
    big = torch.zeros(1024, 1024)  # 4 MiB of float32: sampled, not hashed in full
    digests = {}
    for name, index in (("base", None), ("first", 0), ("last", big.numel() - 1), ("between", 40_000)):
        tensor = big.clone().view(-1)
        if index is not None:
            tensor[index] = 1.0
        folder = tmp_path / name
        folder.mkdir()
        save_file({"w": tensor.view(1024, 1024)}, str(folder / "model.safetensors"))
        files = [folder / "model.safetensors"]
        digests[name] = (fp.weights_digest(files, content="sampled"), fp.weights_digest(files, content="full"))
    assert digests["first"][0] != digests["base"][0]
    assert digests["last"][0] != digests["base"][0]
    between = 40_000 * 4
    assert not any(o <= between < o + n for o, n in sample_offsets(big.numel() * 4))
    assert digests["between"][0] == digests["base"][0]  # sampled: missed, as documented
    assert digests["between"][1] != digests["base"][1]  # full: caught


def test_sample_offsets_cover_small_tensors_and_both_ends_of_large_ones() -> None:
    assert sample_offsets(1000) == [(0, 1000)]
    assert sample_offsets(fp.SAMPLE_BLOCKS * fp.SAMPLE_BLOCK_BYTES) == [(0, fp.SAMPLE_BLOCKS * fp.SAMPLE_BLOCK_BYTES)]
    blocks = sample_offsets(100 * 2**20)
    assert len(blocks) == fp.SAMPLE_BLOCKS
    assert blocks[0] == (0, fp.SAMPLE_BLOCK_BYTES)
    assert blocks[-1][0] + blocks[-1][1] == 100 * 2**20


def test_other_weight_formats_are_hashed_in_full(tmp_path: Path) -> None:
    digests = []
    for name, delta in (("a", 0.0), ("b", 1e-3)):
        folder = tmp_path / name / "Model"
        folder.mkdir(parents=True)
        torch.save(tensors(delta), folder / "pytorch_model.bin")
        (folder / "config.json").write_text(json.dumps(CONFIG))
        digests.append(ident(folder))
    assert digests[0].weights != digests[1].weights
    assert digests[0].weight_files == 1


def test_safetensors_win_over_bin_copies(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    before = ident(model)
    torch.save(tensors(5.0), model / "pytorch_model.bin")
    assert ident(model) == before


def test_unresolvable_repo_id_names_the_model_and_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(FingerprintError) as err:
        resolve_model_dir("nobody-here/no-such-model", cache_dir=tmp_path / "hub")
    assert "nobody-here/no-such-model" in str(err.value)
    assert "model_fingerprint" in str(err.value)
    with pytest.raises(FingerprintError, match="model_fingerprint"):
        model_fingerprint(tmp_path / "missing", dtype="bfloat16")


def test_resolve_model_dir_finds_local_paths_and_hub_cache_snapshots(tmp_path: Path) -> None:
    local = make_model(tmp_path / "local" / "Model")
    assert resolve_model_dir(str(local)) == local.resolve()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    make_model(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    found = resolve_model_dir("org/tiny", cache_dir=tmp_path / "hub")
    assert found == repo / "snapshots" / commit
    assert resolve_model_dir("org/tiny", revision=commit, cache_dir=tmp_path / "hub") == found
    assert ident(found) == ident(local)
    assert ident(found, revision=commit).digest != ident(local).digest


def make_lora(path: Path, delta: float = 0.0, base: str = "/base/model") -> Path:
    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(1)
    weights = {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 16, generator=generator),
               "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(16, 4, generator=generator)}
    weights["base_model.model.layers.0.self_attn.q_proj.lora_B.weight"][0, 0] += delta
    save_file(weights, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                                                          "base_model_name_or_path": base}))
    return path


def test_lora_fingerprint_follows_the_adapter_weights(tmp_path: Path) -> None:
    a = lora_fingerprint(make_lora(tmp_path / "a" / "adapter"))
    assert a != lora_fingerprint(make_lora(tmp_path / "b" / "adapter", delta=1e-3))
    assert a == lora_fingerprint(make_lora(tmp_path / "c" / "other", base="/elsewhere/base"))
    rank = make_lora(tmp_path / "d" / "adapter")
    config = json.loads((rank / "adapter_config.json").read_text()) | {"lora_alpha": 16}
    (rank / "adapter_config.json").write_text(json.dumps(config))
    assert a != lora_fingerprint(rank)
    with pytest.raises(FingerprintError, match="adapter_config.json"):
        lora_fingerprint(tmp_path)


def test_identity_describes_its_parts(tmp_path: Path) -> None:
    identity = ident(make_model(tmp_path / "m"), revision="v1")
    line = identity.describe()
    for part in (identity.digest, identity.config[:12], identity.weights[:12], "bfloat16", "revision v1", "sampled"):
        assert part in line
    assert identity.as_dict()["digest"] == str(identity)
    assert len(identity.digest) == 32


def test_digest_cache_disabled_keeps_nothing(tmp_path: Path, private_cache: Path) -> None:
    ident(make_model(tmp_path / "m"), use_cache=False)
    assert not private_cache.exists()
    cache = DigestCache.disabled()
    cache.put(tmp_path / "m" / "model.safetensors", "k", "d")
    assert cache.get(tmp_path / "m" / "model.safetensors", "k") is None
