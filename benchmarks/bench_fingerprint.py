"""What kvmesh.fingerprint costs at engine start: full-content vs sampled weight digests, cold and warm.

Usage: .venv/bin/python benchmarks/bench_fingerprint.py [--size-gb 8] [--shards 4] [--repeats 3]
       [--alt-repeats 1] [--dir /var/tmp] [--keep] [--skip-demo] [--skip-synthetic]
       [--json results/bench_fingerprint.json]

Two checkpoints: the demo model (SmolLM2-135M, one 0.27 GB safetensors file)
and a synthetic one of ``--size-gb`` GB written here (``--shards`` safetensors
files of random bf16 bytes, tensors shaped like Llama-3-8B's; deleted at the
end unless ``--keep``; cut to fit when the disk has under 20 GB free).  For
each, the median of ``--repeats`` runs (interleaved: each round runs every case
once, so the load of a shared machine shifts all cases alike) of:

* ``model_fingerprint`` with an empty digest cache (a machine's first start),
  for both ways of hashing content: ``sampled`` (kvmesh's default) and ``full``
  (blake3 of every byte, memory-mapped, all cores), and with a filled digest
  cache (every later start);
* a plain sequential read of the files (the disk / page-cache ceiling);
* two alternatives for full hashing (``--alt-repeats`` runs each): one thread,
  and ``read()`` in 16 MiB pieces instead of a memory map.

"cold" runs drop the files from the page cache first
(``posix_fadvise(POSIX_FADV_DONTNEED)`` per file; ``fincore`` confirms it when
installed); "warm" runs read them first unless ``fincore`` says they are all cached.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import blake3
import numpy as np

from kvmesh import fingerprint as fp
from kvmesh.demo.model import default_model_dir

# One Llama-3-8B decoder layer's tensors (bf16): name suffix -> shape
LAYER = {
    "self_attn.q_proj.weight": (4096, 4096), "self_attn.k_proj.weight": (1024, 4096),
    "self_attn.v_proj.weight": (1024, 4096), "self_attn.o_proj.weight": (4096, 4096),
    "mlp.gate_proj.weight": (14336, 4096), "mlp.up_proj.weight": (14336, 4096),
    "mlp.down_proj.weight": (4096, 14336), "input_layernorm.weight": (4096,),
    "post_attention_layernorm.weight": (4096,),
}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
          "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
          "intermediate_size": 14336, "rope_theta": 500000.0, "max_position_embeddings": 8192,
          "torch_dtype": "bfloat16", "vocab_size": 128256}
WRITE_PIECE = 64 * 2**20


@dataclass
class Row:
    checkpoint: str
    what: str
    cache: str  # "cold" / "warm" page cache
    seconds: float
    gb: float  # size of the checkpoint's weight files

    @property
    def gbps(self) -> float:
        return self.gb / self.seconds if self.seconds else float("inf")


# ---------------------------------------------------------------------------------------------
# The synthetic checkpoint


def llama_tensors() -> Iterator[tuple[str, tuple[int, ...]]]:
    """Llama-3-8B's decoder tensors, layer after layer, without end."""
    for layer in itertools.count():
        for suffix, shape in LAYER.items():
            yield f"model.layers.{layer}.{suffix}", shape


def shard_tensors(shard_bytes: int, source: Iterator[tuple[str, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    """The next tensors from ``source`` until they fill ``shard_bytes``."""
    tensors: dict[str, tuple[int, ...]] = {}
    total = 0
    while total < shard_bytes:
        name, shape = next(source)
        tensors[name] = shape
        total += 2 * int(np.prod(shape))
    return tensors


def write_shard(path: Path, tensors: dict[str, tuple[int, ...]], noise: np.ndarray) -> int:
    """A valid safetensors file of these bf16 tensors, filled with (varied) random bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors.items():
        nbytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    piece = noise.copy()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        written, counter = 0, 0
        while written < offset:
            piece[:8] = noise[:8] ^ np.frombuffer(counter.to_bytes(8, "little"), np.uint8)
            chunk = memoryview(piece)[: min(len(piece), offset - written)]
            f.write(chunk)
            written += len(chunk)
            counter += 1
        f.flush()
        os.fsync(f.fileno())
    return path.stat().st_size


def write_synthetic(folder: Path, size_gb: float, shards: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 256, WRITE_PIECE, dtype=np.uint8)
    files, source = [], llama_tensors()
    for index in range(shards):
        tensors = shard_tensors(int(size_gb * 1e9 / shards), source)
        path = folder / f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        write_shard(path, tensors, noise)
        files.append(path)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    from safetensors import safe_open  # the files must be real safetensors, as vLLM would read them

    for path in files:
        with safe_open(str(path), "np") as f:
            assert len(list(f.keys())) > 0
    return files


# ---------------------------------------------------------------------------------------------
# Page cache control and measurement


def drop_page_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(files: list[Path]) -> int | None:
    """Bytes of these files in the page cache, per ``fincore``; None where it is missing."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, files)],
                         capture_output=True, text=True, check=False)
    try:
        return sum(int(line) for line in out.stdout.split())
    except ValueError:
        return None


def read_all(files: list[Path]) -> None:
    buffer = bytearray(16 * 2**20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def hash_by_reading(files: list[Path]) -> None:
    buffer = bytearray(16 * 2**20)
    view = memoryview(buffer)
    for path in files:
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                hasher.update(view[:n])
        hasher.digest()


def hash_one_thread(files: list[Path]) -> None:
    for path in files:
        fp.hash_file(path, max_threads=1)


def prepare(files: list[Path], cache: str) -> None:
    """Drop the files from the page cache ("cold") or make sure all of them are in it ("warm")."""
    if cache == "cold":
        drop_page_cache(files)
        left = resident_bytes(files)
        if left:
            print(f"  note: {left / 1e6:.0f} MB still cached after the drop", file=sys.stderr)
    elif (resident_bytes(files) or 0) < sum(p.stat().st_size for p in files):
        read_all(files)


@dataclass
class Case:
    what: str
    cache: str
    run: Callable[[], object]
    repeats: int
    before: Callable[[], object] | None = None


def run_interleaved(cases: list[Case], files: list[Path]) -> list[float]:
    """Median seconds per case; each round runs every case once, so a load change hits all alike."""
    times: list[list[float]] = [[] for _ in cases]
    for round_ in range(max(case.repeats for case in cases)):
        for case, seconds in zip(cases, times):
            if round_ >= case.repeats:
                continue
            if case.before is not None:
                case.before()
            prepare(files, case.cache)
            started = time.perf_counter()
            case.run()
            seconds.append(time.perf_counter() - started)
    return [statistics.median(t) for t in times]


def measure(name: str, model: Path, repeats: int, alt_repeats: int, work: Path) -> list[Row]:
    files = fp.weight_files(model)
    gb = sum(p.stat().st_size for p in files) / 1e9
    cases: list[Case] = []
    for content in ("sampled", "full"):
        cache_file = work / f"cache-{content}.json"
        fingerprint = functools.partial(fp.model_fingerprint, model, dtype="bfloat16", content=content,
                                        cache_path=cache_file)
        empty = functools.partial(cache_file.unlink, missing_ok=True)

        def filled(f: Path = cache_file, run: Callable[[], object] = fingerprint) -> None:
            if not f.exists():
                run()
        cases += [Case(f"model_fingerprint, {content}, empty digest cache", cache, fingerprint, repeats, empty)
                  for cache in ("cold", "warm")]
        cases.append(Case(f"model_fingerprint, {content}, filled digest cache", "cold", fingerprint, repeats, filled))
    for cache in ("cold", "warm"):
        cases += [Case("read only, no hashing (the I/O ceiling)", cache, lambda: read_all(files), repeats),
                  Case("full alternative: mmap, 1 thread", cache, lambda: hash_one_thread(files), alt_repeats),
                  Case("full alternative: read() 16 MiB, all cores", cache, lambda: hash_by_reading(files),
                       alt_repeats)]
    rows = []
    for case in (c for c in cases if c.cache == "cold"), (c for c in cases if c.cache == "warm"):
        group = list(case)
        for item, seconds in zip(group, run_interleaved(group, files)):
            rows.append(Row(name, item.what, item.cache, seconds, gb))
            print(f"{name:>22} | {item.what:<46} | {item.cache:<4} | {seconds:8.3f} s | {gb / seconds:7.2f} GB/s",
                  flush=True)
    return rows


def print_table(rows: list[Row]) -> None:
    print("\n| checkpoint | what | page cache | seconds | GB/s |\n| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row.checkpoint} | {row.what} | {row.cache} | {row.seconds:.3f} | {row.gbps:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=8.0, help="synthetic checkpoint size (GB)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--alt-repeats", type=int, default=1, help="repeats of the slow full-hash alternatives")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where the synthetic checkpoint goes")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="kvmesh-fp-cache-") as work:
        if not args.skip_demo:
            demo = default_model_dir()
            if not (demo / "model.safetensors").is_file():
                sys.exit(f"the demo model is missing at {demo}: run `.venv/bin/kvmesh model prepare`")
            rows += measure("demo (SmolLM2-135M)", demo, args.repeats, args.alt_repeats, Path(work))
        if not args.skip_synthetic:
            args.dir.mkdir(parents=True, exist_ok=True)
            free_gb = shutil.disk_usage(args.dir).free / 1e9
            size = args.size_gb
            if free_gb < 20:
                size = min(size, max(0.5, free_gb / 4))
                print(f"only {free_gb:.1f} GB free in {args.dir}: synthetic checkpoint cut to {size:.1f} GB")
            folder = Path(tempfile.mkdtemp(prefix="kvmesh-fp-synthetic-", dir=args.dir))
            try:
                started = time.perf_counter()
                files = write_synthetic(folder, size, args.shards)
                total = sum(p.stat().st_size for p in files) / 1e9
                print(f"wrote {total:.2f} GB in {len(files)} shards to {folder} "
                      f"in {time.perf_counter() - started:.1f} s", flush=True)
                rows += measure(f"synthetic {total:.1f} GB", folder, args.repeats, args.alt_repeats, Path(work))
            finally:
                if args.keep:
                    print(f"kept {folder}")
                else:
                    shutil.rmtree(folder, ignore_errors=True)
    print_table(rows)
    print(f"\nload average: {os.getloadavg()}; cores: {os.cpu_count()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) | {"gbps": r.gbps} for r in rows], indent=1))


if __name__ == "__main__":
    main()
