"""What encryption at rest costs: disk tier puts and gets of KV-sized entries, with and without a keyring.

Entries of ``--mb`` MB (a 256-token chunk of the demo model in bf16 is 5.9 MB) are put into a disk tier on
``--dir`` and read back, ``--entries`` at a time, ``--rounds`` times, alternating plain and encrypted in the
same run; medians in GB/s.  The page cache holds the files, so this is the CPU cost of AES-256-GCM (one
copy to join the parts, the encryption, the authentication) against writing and reading the same bytes.

    python benchmarks/bench_encryption.py --dir /var/tmp
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from kvmesh.tiers.disk import DiskTier
from kvmesh.tiers.encrypted import EncryptedTier, Keyring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=5.9)
    parser.add_argument("--entries", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    size = int(args.mb * 1e6)
    payloads = [os.urandom(size) for _ in range(args.entries)]
    total = size * args.entries
    keyring = Keyring([os.urandom(32)])
    times: dict[str, list[float]] = {f"{kind} {op}": [] for kind in ("plain", "encrypted") for op in ("put", "get")}
    for round_ in range(args.rounds):
        for kind in ("plain", "encrypted"):
            directory = Path(tempfile.mkdtemp(prefix="kvmesh-enc-", dir=args.dir))
            try:
                disk = DiskTier(directory, 4 * total)
                tier = EncryptedTier(disk, keyring) if kind == "encrypted" else disk
                keys = [f"{round_}-{i}".encode().ljust(16, b".") for i in range(args.entries)]
                started = time.perf_counter()
                assert all(tier.put_many(list(zip(keys, payloads))))
                times[f"{kind} put"].append(time.perf_counter() - started)
                started = time.perf_counter()
                values = tier.get_many(keys)
                times[f"{kind} get"].append(time.perf_counter() - started)
                assert all(bytes(v) == p for v, p in zip(values, payloads) if v is not None) and None not in values
            finally:
                shutil.rmtree(directory)
    print(f"{args.entries} entries of {size / 1e6:.1f} MB, {args.rounds} rounds, median GB/s")
    print("| operation | plain | encrypted | encrypted / plain |")
    print("| --- | --- | --- | --- |")
    for op in ("put", "get"):
        plain = total / statistics.median(times[f"plain {op}"]) / 1e9
        sealed = total / statistics.median(times[f"encrypted {op}"]) / 1e9
        print(f"| {op} | {plain:.2f} | {sealed:.2f} | {sealed / plain:.0%} |")


if __name__ == "__main__":
    main()
