"""One frozen, validated configuration for kvmesh.

Sources, later ones winning: built-in defaults, a YAML file named by
``KVMESH_CONFIG``, ``KVMESH_<KEY>`` environment variables, and an explicit
mapping (what vLLM passes as ``kv_connector_extra_config``).  An unknown key or
a bad value raises :class:`ConfigError` at start-up, naming the key and what is
allowed, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "KVMESH_"
CONFIG_FILE_ENV = "KVMESH_CONFIG"
# kvmesh's environment variables that are not configuration keys (what each is for); every other KVMESH_*
# variable names a key, and an unknown one stops start-up (a typo must not be ignored)
OTHER_ENV_VARS: dict[str, str] = {
    CONFIG_FILE_ENV: "a YAML file of configuration keys",
    "KVMESH_FINGERPRINT_CACHE": "where model fingerprints remember file digests "
                                "(default ~/.cache/kvmesh/fingerprints.json)",
    "KVMESH_ENGINE_PORT": "set by kvmesh serve: the engine's HTTP port, which its scheduler tells the daemon "
                          "(kvmesh router finds a local engine's daemon by it)",
}


class ConfigError(ValueError):
    """A configuration key is unknown or its value is not allowed."""


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any) -> int:
    """Turn ``2GiB``, ``512MB``, ``1e9`` or an int into a byte count."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 2GiB or 536870912, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
        try:
            as_float = float(value)
        except ValueError:
            pass
        else:
            if as_float.is_integer():
                return int(as_float)
    raise ValueError(f"expected a size such as 2GiB, 512MB or 536870912, got {value!r}")


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"expected true/false (or 1/0, yes/no, on/off), got {value!r}")


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise ValueError(f"expected an integer, got {value!r}")


def parse_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"expected a number, got {value!r}")


def _fraction(value: Any) -> float:
    number = parse_float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"expected a fraction between 0 and 1, got {value!r}")
    return number


def _codec_spec(value: Any) -> str:
    from kvmesh.codecs import get_codec

    spec = parse_str(value).strip()
    get_codec(spec)  # raises ValueError naming the bad name, parameter or value
    return spec


def _codec_spec_or_inherit(value: Any) -> str:
    text = parse_str(value).strip()
    return _codec_spec(text) if text else ""


def _encryption_keys(value: Any) -> str:
    """Checked now (each key base64 or hex of 32 bytes), kept as given: the error never shows a key."""
    text = parse_str(value).strip()
    if text:
        from kvmesh.tiers.encrypted import parse_keys

        parse_keys(text, "encryption_keys")  # a KeyringError is a ValueError naming the bad key's number
    return text


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}; got {value!r}")
        return value

    parse.choices = allowed  # type: ignore[attr-defined]
    return parse


def _opt(default: Any, parse: Callable[[Any], Any], doc: str) -> Any:
    return field(default=default, metadata={"parse": parse, "doc": doc})


@dataclass(frozen=True, slots=True)
class KVMeshConfig:
    """Every setting of kvmesh.  Build with :meth:`load` or :meth:`from_mapping`."""

    chunk_size: int = _opt(
        256, parse_int,
        "Tokens per cache chunk: the unit that is hashed, stored and looked up. "
        "Smaller chunks hit more of a prompt; larger ones cost fewer lookups. "
        "Must be a positive multiple of the engine's block size when used with vLLM.")
    tenant_salt: str = _opt(
        "", parse_str,
        "Mixed into every chunk key, so tenants with different salts never share cache entries.")
    save_partial_chunks: bool = _opt(
        True, parse_bool,
        "Also store the trailing chunk of a prompt that is shorter than chunk_size "
        "(keyed by its exact tokens), so the same prompt repeated hits all of it.")
    l1_size: int = _opt(
        2 * 1024**3, parse_size,
        "Byte budget of the shared-memory L1 tier owned by the node daemon (e.g. 2GiB, 512MB). "
        "Never exceeded: least recently used entries are evicted first.")
    l1_prefault: bool = _opt(
        True, parse_bool,
        "Map every page of the L1 segment when the daemon starts, so the first stores "
        "copy at memory speed instead of paying page faults. The memory itself is reserved at start "
        "either way: an L1 larger than /dev/shm's free space is refused, naming both.")
    l1_eviction: str = _opt(
        "value", _choice("value", "lru"),
        "Which L1 entries go first when it is full: value (a prompt's chunks from its end, the ones that save "
        "least prefill per byte and are used least first, aged: tiers/eviction.py) or lru (least recently "
        "used). On a replayed workload larger than the cache, value served 1.1-1.6x the tokens per GiB of lru "
        "(docs/benchmarks.md).")
    l1_pin_fraction: float = _opt(
        0.25, _fraction,
        "The share of L1 that pinned entries (kvmesh prewarm --pin: a system prompt, tool definitions) may hold "
        "at once. Pinned entries are never evicted until unpinned (kvmesh unpin) or their time runs out; pins "
        "past this share are refused and reported.")
    disk_path: str = _opt(
        "", parse_str,
        "Directory of the L2 disk tier; empty turns it off. Entries survive daemon and engine restarts.")
    disk_size: int = _opt(
        20 * 1024**3, parse_size, "Byte budget of the disk tier (never exceeded; least recently used first out).")
    disk_write_policy: str = _opt(
        "write_behind", _choice("write_behind", "write_through", "on_eviction"),
        "write_behind: stored after the request, from a bounded queue; write_through: before the store "
        "returns to the engine; on_eviction: only when L1 is about to evict it (L1 is the disk's write-back "
        "cache: once L1 is three quarters full, the quarter it would evict next is kept written down) and at "
        "a graceful shutdown.")
    redis_url: str = _opt(
        "", parse_str,
        "URL of the shared L3 tier, e.g. redis://host:6379/0, rediss://user:password@host:6380 (TLS), "
        "or a Valkey server; empty turns it off.")
    redis_cluster: bool = _opt(False, parse_bool, "The URL names a Redis Cluster node.")
    redis_namespace: str = _opt(
        "kvmesh", parse_str, "Prefix of every Redis key, so several deployments share one Redis.")
    redis_ttl_seconds: int = _opt(0, parse_int, "Expire Redis entries after this many seconds; 0 keeps them.")
    redis_timeout_seconds: float = _opt(
        2.0, parse_float, "Socket timeout of Redis calls; a slower call is a miss.")
    redis_lookup_timeout_seconds: float = _opt(
        0.05, parse_float,
        "Deadline of the Redis calls a lookup makes (on the engine's scheduler path): a Redis slower than this "
        "is a miss there, and after repeated misses the breaker keeps lookups away from it. Reads for "
        "promotions and writes keep redis_timeout_seconds. Must be less than call_timeout_seconds.")
    redis_write_policy: str = _opt(
        "write_behind", _choice("write_behind", "write_through", "on_eviction"), "As disk_write_policy, for Redis.")
    redis_admission: str = _opt(
        "all", _choice("all", "on_reuse"),
        "all: every stored chunk goes to Redis; on_reuse: only chunks that two or more lookups asked for.")
    encryption_keys: str = _opt(
        "", _encryption_keys,
        "Encrypt what goes to disk and Redis (AES-256-GCM, each entry bound to its key; a forged, altered or "
        "moved entry is a miss, counted): 32-byte keys as base64 or hex, separated by commas, the first for "
        "writing, all for reading (rotation). A secret: give it as KVMESH_ENCRYPTION_KEYS or in a file "
        "(encryption_key_file), never on a command line.")
    encryption_key_file: str = _opt(
        "", parse_str,
        "A file (mode 600) holding the keys of encryption_keys, one per line; used when encryption_keys is "
        "empty.")
    write_queue_size: int = _opt(
        1024**3, parse_size,
        "Bytes of stores waiting to be written behind; when full, new ones are dropped and counted, "
        "never waited for.")
    call_timeout_seconds: float = _opt(
        1.0, parse_float,
        "Deadline of each call from an engine to the daemon (lookups, leases, stores; they take milliseconds "
        "even under load): a daemon that does not answer in time (stopped, swapping) is a miss, the "
        "connection is dropped and re-made in the background; the engine never waits longer.")
    write_quiet_seconds: float = _opt(
        0.25, parse_float,
        "Writes behind wait until no engine has sent the daemon a message for this long (0: never wait), and "
        "write anyway once half the write queue is full. Added when requests reached their first token "
        "7-10x later while stores were written; the cause was a daemon bound to one core (fixed), and the "
        "wait is kept for machines whose cores are all busy (it costs nothing measured).")
    write_priority: str = _opt(
        "idle", _choice("idle", "normal"),
        "CPU priority of the write-behind thread: idle (Linux's idle scheduling class: it writes only on CPU "
        "time the engines' compute threads do not want) or normal (the daemon's own).")
    prefetch: bool = _opt(
        True, parse_bool, "Start moving chunks found on disk or in Redis into L1 as soon as a lookup finds them.")
    prefetch_threads: int = _opt(
        2, parse_int,
        "Threads that move chunks from disk or Redis into L1 (read, then decode): with two, one chunk's read "
        "overlaps another's decode and compressed entries decode on two cores.")
    prefetch_priority: str = _opt(
        "idle", _choice("idle", "normal"),
        "CPU priority of the prefetch threads: idle (Linux's idle scheduling class, as writes behind: "
        "promotions run only on CPU time the engine's compute threads do not want; a decoding request's p99 "
        "inter-token latency stayed within 1.02x during a promotion from disk, against 1.23x at normal, with "
        "the same time to first token for the promoted request) or normal. While an engine waits for a "
        "promotion (it asks again for a chunk still on its way up), idle threads run at normal priority, nice "
        "19, until nothing is queued: a busy engine would otherwise starve them.")
    instance: str = _opt(
        "default", parse_str,
        "Name of the node daemon; engines that name the same instance share one L1. "
        "Letters, digits, '-', '_' and '.' only.")
    socket_dir: str = _opt(
        "", parse_str,
        "Directory for the daemon's Unix socket (empty: $XDG_RUNTIME_DIR/kvmesh, else /tmp/kvmesh-UID).")
    autostart_daemon: bool = _opt(
        True, parse_bool,
        "Start a node daemon on first use when none answers on the socket (the embedded default).")
    daemon_start_timeout: int = _opt(
        60, parse_int, "Seconds to wait for an auto-started daemon to answer.")
    http_port: int = _opt(
        9477, parse_int,
        "Port of the daemon's HTTP endpoint (/metrics for Prometheus, /health, the live status page at /); "
        "0 turns it off. "
        "A port already in use is logged once and skipped.")
    http_host: str = _opt(
        "127.0.0.1", parse_str, "Address the daemon's HTTP endpoint listens on.")
    lease_seconds: int = _opt(
        120, parse_int,
        "How long entries that a scheduler promised to a worker stay pinned if the worker never "
        "releases them (a crashed engine).")
    copy_threads: int = _opt(
        1, parse_int,
        "Threads that copy KV pages between the engine and shared memory (layers split among them). "
        "Keep 1 on vLLM's CPU backend: extra threads compete with its compute threads (cold prefill ran "
        "70% slower with 2 in bench_longdoc).")
    load_async: str = _opt(
        "auto", _choice("auto", "on", "off"),
        "Load a request's KV while the engine runs its other requests (vLLM's load_async): the request waits "
        "for its copy, nobody else does. auto: on for CUDA engines (copies on a side stream), off on vLLM's CPU "
        "backend, where the copy is a few ms of memcpy and waiting for the next step cost a returning request "
        "1.6-2.3x its time to first token (docs/benchmarks.md). Blended requests always load before their step.")
    gpu_unverified: bool = _opt(
        False, parse_bool,
        "Start the connector in a CUDA engine. kvmesh's GPU copy path is tested on CPU tensors in GPU layouts but "
        "not yet verified on a GPU, so it runs only when asked for (a log line says so).")
    blend: bool = _opt(
        False, parse_bool,
        "Blend every request (CacheBlend-style reuse of passages that are not a prefix) where the engine runs "
        "the blend path (kvmesh serve --blend); without it a request opts in with "
        '"kv_transfer_params": {"kvmesh": {"blend": true}}. Blended KV is approximate: it is never stored or '
        "served as an exact prefix.")
    blend_fraction: float = _opt(
        0.15, _fraction,
        "The share of reused passage tokens a blend recomputes (besides every token no stored passage covers), "
        "chosen by kvmesh's rule: each passage's first tokens, then the largest key deviations at layer 1.")
    blend_min_passage_tokens: int = _opt(
        32, parse_int,
        "Passages shorter than this many tokens are neither stored for blending nor reused: they are computed.")
    blend_boundary_token: int = _opt(
        -1, parse_int,
        "The token id at which each passage starts (a chat message's first token). -1: the token the model's chat "
        "template puts before a message's role (<|im_start|>, <|start_header_id|>); a request may instead name "
        'its passages as token spans ("kv_transfer_params": {"kvmesh": {"blend": true, "passages": [[start, '
        "end], ...]}}).")
    verify_loads: bool = _opt(
        False, parse_bool,
        "After loading KV into the engine, read it back and compare with the stored bytes "
        "(a debugging aid; mismatches are counted in /metrics).")
    codec: str = _opt(
        "raw", _codec_spec,
        "How entries are encoded for the tiers below L1 (L1 always holds the engine's raw pages): raw, "
        "lossless[:compressor=zstd or lz4], fp8, kivi[:bits=2..8,key_bits=N,value_bits=N], "
        "cachegen[:key_bits=6-6-6,value_bits=5-5-5], ecq[:key_step=0.12,value_step=0.15] (the best lossy one "
        "measured: 3.1x smaller at 99.2-99.4% next-token agreement). Lossy codecs change answers slightly "
        "(docs/benchmarks.md has each one's measured quality and size) and apply only to entries whose "
        "K/V axes are known (vLLM-CPU's amx and vec page layouts are; pages of other kernels are stored "
        "lossless by a lossy tier). Entries written with "
        "another codec stay readable.")
    disk_codec: str = _opt(
        "", _codec_spec_or_inherit, "The disk tier's codec; empty: use `codec`.")
    redis_codec: str = _opt(
        "", _codec_spec_or_inherit, "The Redis tier's codec; empty: use `codec`.")
    model_fingerprint: str = _opt(
        "", parse_str,
        "The identity of the model in every key's namespace. Empty (the default): derived from the "
        "checkpoint itself (architecture config, tokenizer, weights digest, revision), so two different "
        "models never share KV even when their folders have the same name. Set it to name the identity "
        "yourself, e.g. the same weights deployed at several paths, or a fleet that deploys by name: "
        "engines that set the same value share entries, so it must change whenever the weights do.")
    promotion_wait_seconds: float = _opt(
        5.0, parse_float,
        "How long a request whose cached chunks lie on disk or in Redis may wait (unscheduled, while "
        "other requests keep running) for them to be promoted into L1; after that it loads what is in "
        "L1 and computes the rest.")
    model_dir: str = _opt(
        "~/.cache/kvmesh/models", parse_str,
        "Where `kvmesh model prepare` writes the demo model checkpoint.")
    log_level: str = _opt(
        "info", _choice("debug", "info", "warning", "error"), "Log level of kvmesh's own logger.")

    def tier_codec(self, tier: str) -> str:
        """The codec spec for a tier below L1 ('disk' or 'redis')."""
        return {"disk": self.disk_codec, "redis": self.redis_codec}[tier] or self.codec

    def __post_init__(self) -> None:
        _check(self.chunk_size >= 1, "chunk_size", f"must be at least 1, got {self.chunk_size}")
        _check(self.l1_size >= 1024**2, "l1_size", f"must be at least 1MiB, got {self.l1_size} bytes")
        _check(bool(re.fullmatch(r"[A-Za-z0-9._-]+", self.instance)), "instance",
               f"may hold only letters, digits, '.', '_' and '-', got {self.instance!r}")
        _check(0 <= self.http_port <= 65535, "http_port", f"must be 0..65535, got {self.http_port}")
        _check(self.disk_size >= 1024**2, "disk_size", f"must be at least 1MiB, got {self.disk_size} bytes")
        _check(self.redis_ttl_seconds >= 0, "redis_ttl_seconds", f"must be 0 or more, got {self.redis_ttl_seconds}")
        _check(self.redis_timeout_seconds > 0, "redis_timeout_seconds",
               f"must be positive, got {self.redis_timeout_seconds}")
        _check(0 < self.redis_lookup_timeout_seconds <= self.redis_timeout_seconds, "redis_lookup_timeout_seconds",
               f"must be positive and at most redis_timeout_seconds ({self.redis_timeout_seconds}), "
               f"got {self.redis_lookup_timeout_seconds}")
        # past the engine's deadline, a lookup waiting for Redis is not a miss but a lost daemon connection: the
        # engine drops it and runs without cache until it is re-made
        _check(self.redis_lookup_timeout_seconds < self.call_timeout_seconds, "redis_lookup_timeout_seconds",
               f"must be less than call_timeout_seconds ({self.call_timeout_seconds}), the engine's deadline for "
               f"the lookup that waits for it; got {self.redis_lookup_timeout_seconds}")
        _check(not self.redis_url or self.redis_url.split("://")[0] in ("redis", "rediss", "unix"), "redis_url",
               f"must start with redis://, rediss:// or unix://, got {self.redis_url!r}")
        _check(self.write_queue_size >= 0, "write_queue_size", f"must be 0 or more, got {self.write_queue_size}")
        _check(1 <= self.copy_threads <= 64, "copy_threads", f"must be 1..64, got {self.copy_threads}")
        _check(1 <= self.prefetch_threads <= 64, "prefetch_threads", f"must be 1..64, got {self.prefetch_threads}")
        _check(self.lease_seconds >= 1, "lease_seconds", f"must be at least 1, got {self.lease_seconds}")
        _check(self.promotion_wait_seconds >= 0, "promotion_wait_seconds",
               f"must be 0 or more, got {self.promotion_wait_seconds}")
        _check(self.daemon_start_timeout >= 1, "daemon_start_timeout",
               f"must be at least 1 second, got {self.daemon_start_timeout}")

    # ----------------------------------------------------------------- building
    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config",
                     base: KVMeshConfig | None = None) -> KVMeshConfig:
        """Validate ``values`` (keys as in :meth:`keys`) over ``base`` (defaults if None)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        parsed: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in fields:
                raise ConfigError(
                    f"{source}: unknown key {key!r}; allowed keys: {', '.join(sorted(fields))}")
            try:
                parsed[key] = fields[key].metadata["parse"](raw)
            except ValueError as err:
                raise ConfigError(f"{source}: bad value for {key!r}: {err}") from None
        start = base if base is not None else cls()
        try:
            return dataclasses.replace(start, **parsed)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_env(cls, env: Mapping[str, str], base: KVMeshConfig | None = None) -> KVMeshConfig:
        values = {}
        for name, raw in env.items():
            if not name.startswith(ENV_PREFIX) or name in OTHER_ENV_VARS:
                continue
            values[name[len(ENV_PREFIX):].lower()] = raw
        return cls.from_mapping(values, source="environment (KVMESH_*)", base=base)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], base: KVMeshConfig | None = None) -> KVMeshConfig:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as err:
            raise ConfigError(f"cannot read config file {str(path)!r}: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
        return cls.from_mapping(data, source=f"config file {str(path)!r}", base=base)

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None,
             env: Mapping[str, str] | None = None) -> KVMeshConfig:
        """Defaults < YAML file ($KVMESH_CONFIG) < KVMESH_* variables < ``overrides``."""
        env = os.environ if env is None else env
        config = cls()
        if env.get(CONFIG_FILE_ENV):
            config = cls.from_yaml(env[CONFIG_FILE_ENV], base=config)
        config = cls.from_env(env, base=config)
        if overrides:
            config = cls.from_mapping(overrides, source="kvmesh config", base=config)
        return config

    # ------------------------------------------------------------------ derived
    def socket_path(self) -> Path:
        base = Path(self.socket_dir) if self.socket_dir else _default_socket_dir()
        return base / f"{self.instance}.sock"

    def shm_name(self) -> str:
        return f"kvmesh-{os.getuid()}-{self.instance}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def shown_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with secrets masked: what may be printed."""
        return masked(self.to_dict())

    def daemon_settings(self) -> dict[str, Any]:
        """The settings a node daemon runs with: every engine that shares it must agree on them."""
        return {key: getattr(self, key) for key in DAEMON_KEYS}

    def daemon_digest(self) -> str:
        """A short digest of :meth:`daemon_settings`, sent in ``hello`` and compared by the daemon."""
        text = json.dumps(self.daemon_settings(), sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


# What the node daemon itself uses: L1, the tiers below it, their codecs, write-behind, prefetch, leases and
# its HTTP endpoint.  An engine that asks for other values must not silently get the running daemon's.
DAEMON_KEYS: tuple[str, ...] = (
    "l1_size", "l1_eviction", "l1_pin_fraction", "disk_path", "disk_size", "disk_write_policy", "redis_url",
    "redis_cluster",
    "redis_namespace", "redis_ttl_seconds", "redis_timeout_seconds", "redis_lookup_timeout_seconds",
    "redis_write_policy", "redis_admission", "write_queue_size", "write_quiet_seconds", "write_priority", "prefetch",
    "prefetch_threads", "prefetch_priority", "lease_seconds", "codec", "disk_codec", "redis_codec", "http_port",
    "http_host", "encryption_keys", "encryption_key_file",
)


def describe_mismatch(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """``key: this engine's value vs the daemon's`` for every daemon setting that differs (secrets masked)."""
    lines = []
    for key in DAEMON_KEYS:  # the daemon sends its settings masked: compare them masked
        if key in theirs and shown(key, mine.get(key)) != theirs[key]:
            lines.append(f"{key}={shown(key, mine.get(key))!r} here, {theirs[key]!r} in the daemon")
    if not lines and any(key in SECRET_KEYS for key in DAEMON_KEYS):
        lines.append("a secret setting (" + ", ".join(k for k in DAEMON_KEYS if k in SECRET_KEYS)
                     + ") differs beyond what may be shown")
    return lines


# settings that must never be shown or put in a command line (ps shows every user's): a Redis URL may hold a
# password, the tenant salt separates tenants.  They travel through the environment or a pipe instead.
SECRET_KEYS: tuple[str, ...] = ("redis_url", "tenant_salt", "encryption_keys")


def shown(key: str, value: Any) -> Any:
    """``value`` as it may be printed: a Redis URL without its credentials, a tenant salt hidden."""
    if key == "redis_url" and isinstance(value, str):
        return re.sub(r"//.*@", "//***@", value)  # up to the last "@": a password may hold "/" or "@"
    if key in SECRET_KEYS and value:
        return "***"
    return value


def masked(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings with every secret shown masked (``kvmesh config show``, ``kvmesh stats``, ``hello``)."""
    return {key: shown(key, value) for key, value in settings.items()}


def _default_socket_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "kvmesh"
    return Path(f"/tmp/kvmesh-{os.getuid()}")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"bad value for {key!r}: {message}")


def describe_keys() -> list[tuple[str, str, str, str]]:
    """(key, environment variable, default, doc) for every key: the source of docs/configuration.md."""
    rows = []
    for f in dataclasses.fields(KVMeshConfig):
        parse = f.metadata["parse"]
        doc = f.metadata["doc"]
        choices = getattr(parse, "choices", None)
        if choices:
            doc += f" One of: {', '.join(choices)}."
        rows.append((f.name, ENV_PREFIX + f.name.upper(), repr(f.default), doc))
    return rows


__all__ = ["DAEMON_KEYS", "ConfigError", "KVMeshConfig", "describe_keys", "describe_mismatch", "parse_size"]
