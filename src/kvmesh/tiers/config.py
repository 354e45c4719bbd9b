"""Each lower tier's own frozen configuration section, derived from :class:`~kvmesh.config.KVMeshConfig`.

A tier is built from its section alone (``DiskTier.from_config``, ``RedisTier.from_config``), so a
tier never reads keys that are not its own and every tier is built the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmesh.config import KVMeshConfig


@dataclass(frozen=True, slots=True)
class DiskTierConfig:
    """The ``disk_*`` keys: where entries go, the byte budget, how they are written and encoded."""

    path: Path
    size: int
    write_policy: str = "write_behind"
    codec: str = "raw"
    fsync: bool = False

    @classmethod
    def from_config(cls, config: KVMeshConfig) -> DiskTierConfig | None:
        """The disk tier's section; None when it is off (no ``disk_path``)."""
        if not config.disk_path:
            return None
        return cls(Path(config.disk_path).expanduser(), config.disk_size, config.disk_write_policy,
                   config.tier_codec("disk"))


@dataclass(frozen=True, slots=True)
class RedisTierConfig:
    """The ``redis_*`` keys; ``ttl_seconds`` None keeps entries (``redis_ttl_seconds`` 0)."""

    url: str
    cluster: bool = False
    namespace: str = "kvmesh"
    ttl_seconds: int | None = None
    timeout_seconds: float = 2.0
    write_policy: str = "write_behind"
    admission: str = "all"
    codec: str = "raw"
    lookup_timeout_seconds: float = 0.05

    @classmethod
    def from_config(cls, config: KVMeshConfig) -> RedisTierConfig | None:
        """The Redis tier's section; None when it is off (no ``redis_url``)."""
        if not config.redis_url:
            return None
        return cls(config.redis_url, config.redis_cluster, config.redis_namespace,
                   config.redis_ttl_seconds or None, config.redis_timeout_seconds, config.redis_write_policy,
                   config.redis_admission, config.tier_codec("redis"), config.redis_lookup_timeout_seconds)
