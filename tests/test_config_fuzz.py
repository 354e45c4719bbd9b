"""Fuzzing the configuration: any value for any key, any YAML text, is a config or a ``ConfigError`` naming it."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmesh.config import ConfigError, KVMeshConfig

KEYS = sorted(f.name for f in dataclasses.fields(KVMeshConfig))
VALUES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30) | \
    st.lists(st.integers(), max_size=3) | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=12), VALUES, max_size=4))
def test_any_values_are_a_config_or_an_error_that_names_the_key(values: dict) -> None:
    try:
        config = KVMeshConfig.from_mapping(values)
    except ConfigError as err:
        assert any(repr(key) in str(err) or key in str(err) for key in values)
        return
    assert KVMeshConfig.from_mapping(config.to_dict()) == config  # what is accepted, round-trips


@FUZZ
@given(st.text(max_size=200))
def test_any_yaml_text_is_a_config_or_a_config_error(text: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        handle.write(text)
    path = Path(handle.name)
    try:
        KVMeshConfig.from_yaml(path)
    except ConfigError as err:
        assert str(path) in str(err)
    finally:
        path.unlink()
