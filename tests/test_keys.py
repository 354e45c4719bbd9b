import os
import subprocess
import sys

import numpy as np
import pytest

from kvmesh.keys import chunk_keys, model_namespace
from kvmesh.layout import KVLayout

DEMO = KVLayout(30, 3, 64, "bfloat16")
TOKENS = list(range(1000, 1000 + 700))


def _hexes(tokens, ns, chunk_size=256, include_partial=False):
    return [k.hex for k in chunk_keys(tokens, ns, chunk_size, include_partial)]


def test_keys_are_identical_in_another_process_with_another_hash_seed() -> None:
    ns = model_namespace("smollm2", DEMO.fingerprint(), "tenant-a")
    here = _hexes(TOKENS, ns, include_partial=True)
    code = (
        "from kvmesh.keys import chunk_keys, model_namespace\n"
        "from kvmesh.layout import KVLayout\n"
        "ns = model_namespace('smollm2', KVLayout(30, 3, 64, 'bfloat16').fingerprint(), 'tenant-a')\n"
        "print(' '.join(k.hex for k in chunk_keys(list(range(1000, 1700)), ns, 256, True)))\n"
    )
    for seed in ("0", "12345"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.split()
        assert out == here


def test_chunk_boundaries_and_partial_tail() -> None:
    ns = model_namespace("m", DEMO.fingerprint())
    full = chunk_keys(TOKENS, ns, 256)
    assert [(k.start, k.end) for k in full] == [(0, 256), (256, 512)]
    with_tail = chunk_keys(TOKENS, ns, 256, include_partial=True)
    assert [(k.start, k.end) for k in with_tail] == [(0, 256), (256, 512), (512, 700)]
    assert with_tail[:2] == full


def test_keys_chain_so_a_changed_token_changes_every_later_key() -> None:
    ns = model_namespace("m", DEMO.fingerprint())
    changed = list(TOKENS)
    changed[10] += 1
    a, b = chunk_keys(TOKENS, ns, 256, True), chunk_keys(changed, ns, 256, True)
    assert all(x.digest != y.digest for x, y in zip(a, b))
    changed_late = list(TOKENS)
    changed_late[300] += 1
    c = chunk_keys(changed_late, ns, 256, True)
    assert c[0] == a[0] and c[1].digest != a[1].digest and c[2].digest != a[2].digest


def test_partial_chunk_key_differs_from_full_chunk_with_same_start() -> None:
    ns = model_namespace("m", DEMO.fingerprint())
    partial = chunk_keys(TOKENS[:300], ns, 256, include_partial=True)[1]
    full = chunk_keys(TOKENS[:512], ns, 256)[1]
    assert partial.digest != full.digest


@pytest.mark.parametrize("other", [
    ("other-model", DEMO.fingerprint(), ""),
    ("smollm2", KVLayout(30, 3, 64, "float16").fingerprint(), ""),
    ("smollm2", KVLayout(32, 8, 128, "bfloat16").fingerprint(), ""),
    ("smollm2", DEMO.fingerprint(), "tenant-b"),
])
def test_model_layout_and_salt_change_every_key(other) -> None:
    base = chunk_keys(TOKENS, model_namespace("smollm2", DEMO.fingerprint(), ""), 256)
    changed = chunk_keys(TOKENS, model_namespace(*other), 256)
    assert all(x.digest != y.digest for x, y in zip(base, changed))


def test_numpy_and_list_inputs_agree_and_bad_tokens_fail() -> None:
    ns = model_namespace("m", DEMO.fingerprint())
    assert chunk_keys(np.array(TOKENS, dtype=np.int32), ns, 256) == chunk_keys(TOKENS, ns, 256)
    with pytest.raises(ValueError, match="token ids"):
        chunk_keys([-1] * 300, ns, 256)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_keys(TOKENS, ns, 0)


def test_namespaces_and_keys_are_the_ones_stored_entries_were_written_under() -> None:
    # a change here strands every stored entry: the namespace was computed before page formats had one
    # description; the key since chains start at the namespace's own root (no longer at an all-zero parent
    # shared by every namespace, under which every prompt shorter than a chunk was indexed)
    ns = model_namespace("smollm2", "L30.H3.D64.bfloat16.pages16.vllm-cpu-vec", "tenant-a")
    assert ns.hex() == "9185f5c340bd75f968a8572bbd666a4b"
    assert KVLayout(30, 3, 64, "bfloat16", 16, "vllm-cpu-vec").namespace("smollm2", "tenant-a") == ns
    assert chunk_keys(list(range(1000, 1300)), ns, 256)[0].hex == "92fad15f6ae7193b35b9506713ba0758"


def test_part_keys_name_the_rank_the_world_and_the_group_and_leave_single_workers_keys_alone() -> None:
    from kvmesh.keys import PartKeys

    digest = chunk_keys(list(range(64)), model_namespace("m", "l"), 32)[0].digest
    assert PartKeys(0, 1)(digest) == digest
    mapped = {PartKeys(rank, world)(digest) for world in (2, 4) for rank in range(world)}
    assert len(mapped) == 6 and digest not in mapped
    assert PartKeys(1, 2)(digest) == PartKeys(1, 2)(digest)
    parts = PartKeys.every_part(2, 3)
    assert parts[0] == PartKeys(0, 2, 0) and len({part(digest) for part in parts}) == 6
    assert PartKeys(0, 1, 1)(digest) not in {digest, *mapped}
    with pytest.raises(ValueError, match="rank 2 is not one of a world of 2"):
        PartKeys(2, 2)
    with pytest.raises(ValueError, match="group's index is not negative, got -1"):
        PartKeys(0, 1, -1)
