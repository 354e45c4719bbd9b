"""A model fingerprint that names the weights, not the folder.

KV entries may only be shared between engines that would compute the same KV
for the same token ids.  A directory name does not say that: ``/a/Model`` and
``/b/Model`` can hold different checkpoints, and one checkpoint can live under
many paths.  :func:`model_fingerprint` therefore hashes what determines the KV:

* the architecture config (``config.json``), minus the few fields that tools
  write but no engine reads (see :data:`IGNORED_CONFIG_FIELDS`);
* the KV dtype the engine uses (the ``dtype`` argument);
* the tokenizer: vocabulary, merges, special tokens and chat templates;
* the weights: every safetensors file's header (tensor names, dtypes, shapes,
  offsets) plus a content digest (:data:`DEFAULT_CONTENT` says how much content;
  ``docs/benchmarks.md`` has the measurement behind it); other weight formats
  (``.bin``, ``.pt``, ``.pth``, ``.gguf``) are hashed in full;
* the revision, when the engine was given one.

The rule throughout is that leaving something out could make two different
models share KV (wrong answers), while putting too much in only costs cache
hits; so when in doubt a file or field is included.

Weight digests are slow to compute and never change for a file that has not
changed, so each one is cached in a small JSON file keyed by the file's
resolved path, size, ``mtime_ns`` and inode (:class:`~kvmesh.fingerprint.cache.DigestCache`).
File hashing is in ``hashing.py``, the cache in ``cache.py``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from kvmesh.fingerprint.cache import CACHE_ENV, DEFAULT_CACHE_PATH, DigestCache
from kvmesh.fingerprint.hashing import (
    DIGEST_BYTES,
    SAMPLE_BLOCK_BYTES,
    SAMPLE_BLOCKS,
    FingerprintError,
    combine,
    hash_bytes,
    hash_file,
    read_safetensors_header,
    sample_offsets,
    sampled_tensors_digest,
)

log = logging.getLogger(__name__)

FINGERPRINT_VERSION = b"kvmesh-model-fingerprint-v1"

Content = Literal["sampled", "full"]
#: How much of a safetensors file's tensor bytes the weights digest reads by default.
DEFAULT_CONTENT: Content = "sampled"

#: config.json fields written by the tools that saved the checkpoint, read by no engine.
IGNORED_CONFIG_FIELDS = frozenset({
    "transformers_version", "_name_or_path", "_commit_hash", "_attn_implementation_autoset",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict",
})
#: tokenizer_config.json fields that hold where the tokenizer was saved from, not what it does.
IGNORED_TOKENIZER_FIELDS = frozenset({"name_or_path", "_commit_hash", "tokenizer_file"})
#: adapter_config.json fields that name the tools or the base model's path; the base model's
#: identity comes from the engine's model fingerprint, not from where the adapter was trained.
IGNORED_ADAPTER_FIELDS = frozenset({"base_model_name_or_path", "peft_version", "transformers_version"})

#: Files that define how text becomes token ids and how chats become text.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
    "sentencepiece.bpe.model", "tekken.json", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json",
)
_TOKENIZER_GLOBS = ("tokenizer.model.v*", "additional_chat_templates/*.jinja")
_CONFIG_FILES = ("config.json", "params.json")  # params.json: Mistral's own format
_OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".gguf")
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "float": "float32", "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn",
                  "fp8_e5m2": "float8_e5m2"}


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """What names a model's KV: the final digest and the parts it folds, for logs and stats."""

    digest: str
    config: str
    tokenizer: str
    weights: str
    dtype: str
    revision: str | None
    content: str  # how the weights' tensor bytes were hashed: "sampled" or "full"
    weight_files: int
    weight_bytes: int

    def __str__(self) -> str:
        return self.digest

    def describe(self) -> str:
        """One log line: every part's digest, so two engines that disagree show why."""
        revision = f", revision {self.revision}" if self.revision else ""
        return (f"model {self.digest} (config {self.config[:12]}, tokenizer {self.tokenizer[:12]}, "
                f"weights {self.weights[:12]} [{self.content}, {self.weight_files} files, "
                f"{self.weight_bytes / 1e9:.2f} GB], dtype {self.dtype}{revision})")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Finding the model


def resolve_model_dir(name_or_path: str, revision: str | None = None, *,
                      cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A local path as given, else the Hugging Face cache's snapshot of the repo id.

    Only local files are consulted (no network): kvmesh must not download a
    model the engine already has, nor fail differently from the engine when
    offline.  ``cache_dir`` is the hub cache to look in (vLLM's
    ``download_dir``); by default huggingface_hub's own (``HF_HUB_CACHE``).
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise FingerprintError(f"kvmesh cannot fingerprint model {name_or_path!r}: it is not a local path, and "
                               "huggingface_hub, which finds cached repos, is not installed; set the kvmesh "
                               "config key `model_fingerprint` to a string that names these weights") from err
    try:
        snapshot = snapshot_download(repo_id=name_or_path, revision=revision,
                                     cache_dir=None if cache_dir is None else str(cache_dir),
                                     local_files_only=True)
    except Exception as err:  # any failure means: nothing local to hash
        at = f" at revision {revision!r}" if revision else ""
        raise FingerprintError(
            f"kvmesh cannot fingerprint model {name_or_path!r}: it is not a local path and the "
            f"Hugging Face cache on this machine has no snapshot of it{at} ({type(err).__name__}); "
            "set the kvmesh config key `model_fingerprint` to a string that names these weights "
            "(for example their commit hash)") from err
    return Path(str(snapshot))


# ---------------------------------------------------------------------------------------------
# The fingerprint


def model_fingerprint(model_dir: str | os.PathLike[str], *, tokenizer_dir: str | os.PathLike[str] | None = None,
                      revision: str | None = None, dtype: str, content: Content = DEFAULT_CONTENT,
                      cache_path: str | os.PathLike[str] | None = None,
                      use_cache: bool = True) -> ModelIdentity:
    """Fingerprint the checkpoint in ``model_dir`` (a directory, or one ``.gguf`` file).

    ``tokenizer_dir`` defaults to ``model_dir``; ``dtype`` is the KV dtype the
    engine computes in (``"bfloat16"``, ``torch.float16``, ...; not ``"auto"``,
    which resolves differently on different hardware).  ``content`` and
    ``cache_path`` are described at :func:`weights_digest` and
    :class:`DigestCache`; engines that share a cache must use the same
    ``content``, since it changes the digest.
    """
    model = Path(model_dir).expanduser()
    if not model.exists():
        raise FingerprintError(f"kvmesh cannot fingerprint model {str(model_dir)!r}: no such file or "
                               "directory; set the kvmesh config key `model_fingerprint` to name it")
    tokenizer = Path(tokenizer_dir).expanduser() if tokenizer_dir is not None else model
    if not tokenizer.exists():
        raise FingerprintError(f"kvmesh cannot fingerprint the tokenizer {str(tokenizer_dir)!r} of model "
                               f"{str(model_dir)!r}: no such file or directory (resolve a repo id with "
                               "resolve_model_dir)")
    kv_dtype = normalize_dtype(dtype)
    config = config_digest(model)
    files = weight_files(model)
    with DigestCache.open(cache_path, enabled=use_cache) as cache:
        weights = weights_digest(files, content=content, cache=cache)
        if tokenizer.is_dir():
            tok = tokenizer_digest(tokenizer)
        else:  # a GGUF file carries its tokenizer
            tok = combine(b"tokenizer-in-file", weights_digest([tokenizer], content=content, cache=cache))
    digest = combine(FINGERPRINT_VERSION, config, tok, weights, kv_dtype, revision or "")
    return ModelIdentity(digest=digest, config=config, tokenizer=tok, weights=weights, dtype=kv_dtype,
                         revision=revision, content=content, weight_files=len(files),
                         weight_bytes=sum(f.stat().st_size for f in files))


def lora_fingerprint(lora_dir: str | os.PathLike[str], *, content: Content = "full",
                     cache_path: str | os.PathLike[str] | None = None, use_cache: bool = True) -> str:
    """The digest of a LoRA adapter: its config, weights and any tokenizer it ships.

    Adapters are small (MBs to a few hundred MB), so their weights are hashed in
    full by default.  The base model is not part of it: combine this with the
    engine's :func:`model_fingerprint`.
    """
    lora = Path(lora_dir).expanduser()
    config_file = lora / "adapter_config.json"
    if not config_file.is_file():
        raise FingerprintError(f"kvmesh cannot fingerprint LoRA adapter {str(lora_dir)!r}: "
                               "it has no adapter_config.json")
    files = [p for p in sorted(lora.iterdir()) if _is_adapter_weight(p.name)]
    if not files:
        raise FingerprintError(f"kvmesh cannot fingerprint LoRA adapter {str(lora_dir)!r}: it has no "
                               "adapter_model.safetensors or adapter_model.bin")
    with DigestCache.open(cache_path, enabled=use_cache) as cache:
        weights = weights_digest(files, content=content, cache=cache)
    config = _json_digest(config_file, IGNORED_ADAPTER_FIELDS)
    return combine(b"kvmesh-lora-fingerprint-v1", config, tokenizer_digest(lora), weights)


def _is_adapter_weight(name: str) -> bool:
    stem, _, suffix = name.partition(".")
    return stem in ("adapter_model", "new_embeddings") and suffix in ("safetensors", "bin", "pt")


def normalize_dtype(dtype: Any) -> str:
    """``torch.bfloat16``, ``"bf16"`` and ``"bfloat16"`` all name one KV dtype: ``"bfloat16"``."""
    name = str(dtype).strip().removeprefix("torch.").lower()
    name = _DTYPE_ALIASES.get(name, name)
    if not name or name == "auto":
        raise FingerprintError(f"model_fingerprint needs the KV dtype the engine resolved, not {dtype!r}")
    return name


def config_digest(model: Path) -> str:
    """Digest of the architecture config: the whole of config.json, minus tool metadata.

    The whole file rather than a list of attention fields: every new
    architecture brings fields that change the KV (MLA ranks, partial rotary
    factors, logit soft-capping, per-layer attention types, rope parameter
    layouts), and a list that misses one would let two models share KV.  A
    field hashed needlessly only costs hits, so only the fields below, which
    tools write and engines never read, are dropped: ``transformers_version``,
    ``_name_or_path`` and friends (:data:`IGNORED_CONFIG_FIELDS`), at any depth
    (multimodal configs nest ``text_config``).  transformers >= 4.56 writes
    ``dtype`` where older versions wrote ``torch_dtype``; both are hashed as
    ``torch_dtype``.  A model given as one file (GGUF) has no config beside it:
    its config is inside the file, which the weights digest hashes in full.
    """
    if model.is_file():
        return combine(b"config-in-weights")
    for name in _CONFIG_FILES:
        if (model / name).is_file():
            config = _strip(_load_json(model / name), IGNORED_CONFIG_FIELDS)
            if isinstance(config, dict) and "dtype" in config and "torch_dtype" not in config:
                config["torch_dtype"] = config.pop("dtype")
            elif isinstance(config, dict) and config.get("dtype", object()) == config.get("torch_dtype"):
                del config["dtype"]
            return combine(name.encode(), _canonical_digest(config))
    raise FingerprintError(f"kvmesh cannot fingerprint model {str(model)!r}: it has no config.json; set "
                           "the kvmesh config key `model_fingerprint` to name it")


def tokenizer_digest(tokenizer: Path) -> str:
    """Digest of every tokenizer and chat-template file present (their names and bytes).

    A chunk key hashes token ids, so the tokenizer does not change the KV of
    given ids; it is hashed because it (and the chat template) decides which
    ids a request becomes, so it is part of which model users are served, and
    an engine whose tokenizer differs is treated as a different model.
    tokenizer_config.json is hashed as canonical JSON without the path it was
    saved from; the other files byte for byte.
    """
    parts: list[str] = []
    for path in _tokenizer_files(tokenizer):
        name = path.relative_to(tokenizer).as_posix()
        if path.name == "tokenizer_config.json":
            digest = _json_digest(path, IGNORED_TOKENIZER_FIELDS)
        else:
            digest = hash_file(path, max_threads=1)
        parts += [name, digest]
    return combine(b"tokenizer", *parts)


def _tokenizer_files(tokenizer: Path) -> list[Path]:
    found = {tokenizer / name for name in TOKENIZER_FILES if (tokenizer / name).is_file()}
    for pattern in _TOKENIZER_GLOBS:
        found.update(p for p in tokenizer.glob(pattern) if p.is_file())
    return sorted(found)


def weight_files(model: Path) -> list[Path]:
    """The weight files an engine loads from ``model``: its top-level safetensors if any, else the others.

    vLLM prefers safetensors when a checkpoint ships both formats, so the
    ``.bin`` copies many repos carry (and subfolders such as ``original/``)
    are not read.
    """
    if model.is_file():
        return [model]
    files = sorted(p for p in model.iterdir() if p.is_file())
    chosen = [p for p in files if p.suffix == ".safetensors"]
    if not chosen:
        chosen = [p for p in files if p.suffix in _OTHER_WEIGHT_SUFFIXES]
    if not chosen:
        raise FingerprintError(f"kvmesh cannot fingerprint model {str(model)!r}: no weight files "
                               "(*.safetensors, *.bin, *.pt, *.pth, *.gguf) in it")
    return chosen


# ---------------------------------------------------------------------------------------------
# Weights


def weights_digest(files: Iterable[Path], *, content: Content = DEFAULT_CONTENT,
                   cache: DigestCache | None = None) -> str:
    """Digest of weight files by name: safetensors headers plus content; other formats in full.

    ``content="full"`` hashes every byte of every file (blake3, all cores).
    ``content="sampled"`` hashes, for each safetensors file, its whole header
    (every tensor's name, dtype, shape and byte offsets) and each tensor's
    bytes in full when the tensor is at most ``SAMPLE_BLOCKS *
    SAMPLE_BLOCK_BYTES`` (1 MiB: norms, biases, small projections), else
    ``SAMPLE_BLOCKS`` blocks of ``SAMPLE_BLOCK_BYTES`` spread evenly from the
    tensor's first byte to its last.  What sampling does not catch: two
    checkpoints with identical headers whose differences lie only in bytes of
    tensors larger than 1 MiB outside the sampled blocks (16 x 64 KiB per
    tensor: 3.1% of a 4096x4096 bf16 matrix, 0.9% of a 14336x4096 one):
    edits of a few values, pruning of a sparse set of weights, updates
    confined to a few rows (such as training only some token embeddings,
    when the tokenizer files stay the same) and on-disk corruption.  Full
    training, fine-tuning, merging a LoRA or re-quantizing change every block
    of the tensors they touch (or the header) and are caught.  Bytes outside
    every tensor (alignment padding) are not hashed in sampled mode.  Where
    such checkpoints may meet under one cache, use ``content="full"``.
    """
    if content not in ("sampled", "full"):
        raise ValueError(f"content must be 'sampled' or 'full', not {content!r}")
    cache = cache if cache is not None else DigestCache.disabled()
    parts: list[str] = []
    for path in files:
        kind = _digest_kind(path, content)
        digest = cache.get(path, kind)
        if digest is None:
            digest = _weight_file_digest(path, content)
            cache.put(path, kind, digest)
        parts += [path.name, digest]
    return combine(b"weights", *parts)


def _digest_kind(path: Path, content: Content) -> str:
    """Names the algorithm in the cache, so a change of mode or of sampling never reads a stale digest."""
    if path.suffix != ".safetensors":
        return "file-full-v1"
    if content == "full":
        return "safetensors-full-v1"
    return f"safetensors-sampled-{SAMPLE_BLOCKS}x{SAMPLE_BLOCK_BYTES}-v1"


def _weight_file_digest(path: Path, content: Content) -> str:
    if path.suffix != ".safetensors":
        return hash_file(path)
    header, data_start, tensors = read_safetensors_header(path)
    if content == "full":
        return combine(b"safetensors-full", hash_bytes(header), hash_file(path))
    return combine(b"safetensors-sampled", hash_bytes(header), sampled_tensors_digest(path, data_start, tensors))


def _json_digest(path: Path, ignored: frozenset[str]) -> str:
    """Digest of a JSON file as canonical JSON (sorted keys), without ``ignored`` fields at any depth."""
    return _canonical_digest(_strip(_load_json(path), ignored))


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FingerprintError(f"kvmesh cannot read {path} as JSON ({err})") from err


def _canonical_digest(data: Any) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hash_bytes(canonical.encode())


def _strip(value: Any, ignored: frozenset[str]) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v, ignored) for k, v in value.items() if k not in ignored}
    if isinstance(value, list):
        return [_strip(v, ignored) for v in value]
    return value


__all__ = [
    "CACHE_ENV", "DEFAULT_CACHE_PATH", "DEFAULT_CONTENT", "DIGEST_BYTES", "SAMPLE_BLOCKS", "SAMPLE_BLOCK_BYTES",
    "DigestCache", "FingerprintError", "ModelIdentity", "config_digest", "hash_file", "lora_fingerprint",
    "model_fingerprint", "normalize_dtype", "read_safetensors_header", "resolve_model_dir", "sample_offsets",
    "tokenizer_digest", "weight_files", "weights_digest",
]
