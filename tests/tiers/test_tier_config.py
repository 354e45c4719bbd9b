"""Each tier's config section, and tiers built from them."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from kvmesh.config import KVMeshConfig
from kvmesh.store.build import build_lower_tiers
from kvmesh.tiers.config import DiskTierConfig, RedisTierConfig
from kvmesh.tiers.disk import DiskTier


def test_sections_carry_their_own_keys(tmp_path: Path) -> None:
    config = KVMeshConfig.from_mapping({"disk_path": str(tmp_path), "disk_size": "64MiB", "codec": "lossless",
                                        "redis_url": "redis://127.0.0.1:1/0", "redis_ttl_seconds": 0,
                                        "redis_admission": "on_reuse", "redis_codec": "fp8"})
    assert DiskTierConfig.from_config(config) == DiskTierConfig(tmp_path, 64 << 20, "write_behind", "lossless")
    assert RedisTierConfig.from_config(config) == RedisTierConfig(
        "redis://127.0.0.1:1/0", False, "kvmesh", None, 2.0, "write_behind", "on_reuse", "fp8")
    assert DiskTierConfig.from_config(KVMeshConfig()) is None and RedisTierConfig.from_config(KVMeshConfig()) is None


def test_the_disk_tier_is_built_from_its_section(tmp_path: Path) -> None:
    tiers = build_lower_tiers(KVMeshConfig.from_mapping({"disk_path": str(tmp_path / "d"), "disk_size": "8MiB",
                                                         "disk_write_policy": "write_through"}))
    assert len(tiers) == 1 and isinstance(tiers[0].tier, DiskTier)
    assert (tiers[0].tier.capacity, tiers[0].tier.directory, tiers[0].write_policy) == (
        8 << 20, tmp_path / "d", "write_through")


def test_a_missing_redis_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # what an installation without the extra looks like
    monkeypatch.delitem(sys.modules, "kvmesh.tiers.redis", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'kvmesh\[redis\]'"):
        importlib.import_module("kvmesh.tiers.redis")
    monkeypatch.undo()
    importlib.import_module("kvmesh.tiers.redis")  # back for the other tests
