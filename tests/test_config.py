from pathlib import Path

import pytest

from kvmesh.config import ConfigError, KVMeshConfig, describe_keys, parse_size


def test_defaults_are_valid() -> None:
    config = KVMeshConfig.load(env={})
    assert config.chunk_size == 256
    assert config.l1_size == 2 * 1024**3


def test_unknown_key_is_named_with_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as err:
        KVMeshConfig.from_mapping({"chunk_sise": 128})
    assert "'chunk_sise'" in str(err.value)
    assert "chunk_size" in str(err.value)  # the allowed keys are listed


@pytest.mark.parametrize("key, value, fragment", [
    ("chunk_size", 0, "chunk_size"),
    ("chunk_size", "many", "chunk_size"),
    ("l1_size", "2 bananas", "l1_size"),
    ("l1_size", "10KiB", "l1_size"),
    ("codec", "zip", "raw"),
    ("disk_codec", "kivi:bits=9", "2..8"),
    ("redis_codec", "cachegen:level=x", "level"),
    ("log_level", "loud", "debug"),
    ("save_partial_chunks", "maybe", "save_partial_chunks"),
    ("instance", "a/b", "instance"),
    ("prefetch_threads", 0, "must be 1..64, got 0"),
])
def test_bad_values_fail_naming_the_key(key: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        KVMeshConfig.from_mapping({key: value})
    assert repr(key) in str(err.value)
    assert fragment in str(err.value)


def test_precedence_defaults_yaml_env_mapping(tmp_path: Path) -> None:
    path = tmp_path / "kvmesh.yaml"
    path.write_text("chunk_size: 64\nl1_size: 512MiB\ntenant_salt: from-yaml\n")
    env = {"KVMESH_CONFIG": str(path), "KVMESH_L1_SIZE": "1GiB", "KVMESH_TENANT_SALT": "from-env"}
    config = KVMeshConfig.load({"tenant_salt": "from-dict"}, env=env)
    assert config.chunk_size == 64
    assert config.l1_size == 1024**3
    assert config.tenant_salt == "from-dict"


def test_env_error_names_the_source_and_key() -> None:
    with pytest.raises(ConfigError) as err:
        KVMeshConfig.load(env={"KVMESH_CHUNK_SIZE": "-3"})
    assert "chunk_size" in str(err.value)
    with pytest.raises(ConfigError) as err:
        KVMeshConfig.load(env={"KVMESH_NOPE": "1"})
    assert "environment" in str(err.value) and "'nope'" in str(err.value)


def test_yaml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        KVMeshConfig.load(env={"KVMESH_CONFIG": str(bad)})
    with pytest.raises(ConfigError, match="cannot read"):
        KVMeshConfig.load(env={"KVMESH_CONFIG": str(tmp_path / "missing.yaml")})


def test_config_is_frozen() -> None:
    config = KVMeshConfig()
    with pytest.raises(AttributeError):
        config.chunk_size = 1  # type: ignore[misc]


def test_sizes() -> None:
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("512MB") == 512 * 1000**2
    assert parse_size("1e9") == 10**9
    assert parse_size(4096) == 4096


def test_every_key_is_documented() -> None:
    text = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    for key, env_name, _default, _doc in describe_keys():
        assert f"`{key}`" in text, f"docs/configuration.md does not document {key}"
        assert env_name in text


def test_tier_codecs_inherit_the_default_codec() -> None:
    config = KVMeshConfig.from_mapping({"codec": "lossless", "redis_codec": "cachegen:key_bits=6"})
    assert config.tier_codec("disk") == "lossless"
    assert config.tier_codec("redis") == "cachegen:key_bits=6"


def test_kvmeshs_own_other_variables_are_not_read_as_keys(tmp_path: Path) -> None:
    """KVMESH_FINGERPRINT_CACHE (which the docs name) once stopped every kvmesh process as an unknown key."""
    env = {"KVMESH_FINGERPRINT_CACHE": str(tmp_path / "digests.json"), "KVMESH_L1_SIZE": "1GiB"}
    assert KVMeshConfig.load(env=env).l1_size == 1 << 30
    with pytest.raises(ConfigError, match="fingerprint_cach"):
        KVMeshConfig.load(env={"KVMESH_FINGERPRINT_CACH": "x"})  # a typo still stops start-up, named
    docs = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    assert "`KVMESH_FINGERPRINT_CACHE`" in docs


def test_secrets_are_shown_masked() -> None:
    from kvmesh.config import masked, shown

    assert shown("redis_url", "rediss://user:pa/ss@w@host:6380/0") == "rediss://***@host:6380/0"
    assert shown("redis_url", "redis://host:6379") == "redis://host:6379"
    config = KVMeshConfig.from_mapping({"redis_url": "redis://:hunter2@h:1/0", "tenant_salt": "acme"})
    shown_settings = config.shown_dict()
    assert shown_settings["redis_url"] == "redis://***@h:1/0" and shown_settings["tenant_salt"] == "***"
    assert "hunter2" not in str(masked(config.daemon_settings()))


def test_a_redis_lookup_may_not_outlast_the_engines_call_that_waits_for_it() -> None:
    """Past call_timeout_seconds the engine drops its daemon connection (no cache until it is re-made), so a Redis
    lookup deadline at or past it would turn slow lookups into lost connections instead of misses."""
    with pytest.raises(ConfigError, match=r"'redis_lookup_timeout_seconds'.*less than call_timeout_seconds \(1.0\)"):
        KVMeshConfig.from_mapping({"redis_lookup_timeout_seconds": 1.0, "redis_timeout_seconds": 2.0})
    config = KVMeshConfig.from_mapping({"redis_lookup_timeout_seconds": 5.0, "redis_timeout_seconds": 10.0,
                                        "call_timeout_seconds": 15.0})
    assert config.redis_lookup_timeout_seconds < config.call_timeout_seconds
