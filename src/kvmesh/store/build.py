"""The configured tiers below L1, each built from its own config section and imported only when configured."""

from __future__ import annotations

import threading
from dataclasses import replace

from kvmesh.codecs import Codec, get_codec
from kvmesh.config import KVMeshConfig
from kvmesh.store.types import LowerTier
from kvmesh.tiers.config import DiskTierConfig, RedisTierConfig
from kvmesh.tiers.encrypted import EncryptedTier, load_keyring


def build_lower_tiers(config: KVMeshConfig, warm_up: bool = False) -> list[LowerTier]:
    """Disk first, then Redis (a lookup and a promotion try them in this order).

    With ``warm_up`` (the daemon), Redis's connections open on a thread now, not inside the first lookup.

    Tiers with the same codec spec share one codec object, so the store encodes an entry once for both.
    """
    tiers: list[LowerTier] = []
    codecs: dict[str, Codec] = {}

    def codec_for(spec: str) -> Codec:
        return codecs.setdefault(spec, get_codec(spec))

    disk = DiskTierConfig.from_config(config)
    if disk is not None:
        from kvmesh.tiers.disk import DiskTier

        tiers.append(LowerTier(DiskTier.from_config(disk), disk.write_policy,  # type: ignore[arg-type]
                               codec=codec_for(disk.codec)))
    redis = RedisTierConfig.from_config(config)
    if redis is not None:
        # needs the redis extra, and says so when it is missing
        from kvmesh.tiers.redis import RedisTier

        redis_tier = RedisTier.from_config(redis)
        if warm_up:  # beside the daemon's start, not inside the first lookup's 50 ms deadline
            threading.Thread(target=redis_tier.warm_up, name="kvmesh-redis-warm-up", daemon=True).start()
        tiers.append(LowerTier(redis_tier, redis.write_policy,  # type: ignore[arg-type]
                               redis.admission, codec=codec_for(redis.codec)))  # type: ignore[arg-type]
    keyring = load_keyring(config.encryption_keys, config.encryption_key_file)
    if keyring is not None:  # everything below L1 encrypted at rest (tiers/encrypted.py)
        tiers = [replace(t, tier=EncryptedTier(t.tier, keyring)) for t in tiers]
    return tiers
