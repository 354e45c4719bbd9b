import json

import pytest

from kvmesh.config import ConfigError
from kvmesh.integrations.vllm.serve import build_serve_command


def test_serve_command_enables_the_connector_and_passes_other_arguments_through() -> None:
    command = build_serve_command("/models/m", ["--port", "8001", "--enforce-eager"], {"l1_size": "1GiB"},
                                  python="/usr/bin/python3")
    assert command.argv[:5] == ["/usr/bin/python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/m"]
    transfer = json.loads(command.argv[command.argv.index("--kv-transfer-config") + 1])
    assert transfer["kv_connector"] == "KVMeshConnector"
    assert transfer["kv_connector_module_path"] == "kvmesh.integrations.vllm.connector"
    assert transfer["kv_load_failure_policy"] == "recompute"
    settings = transfer["kv_connector_extra_config"]
    assert settings["l1_size"] == "1GiB"
    assert settings["disk_path"].endswith("/.cache/kvmesh/disk/default")  # the embedded disk tier
    assert command.argv[-3:] == ["--port", "8001", "--enforce-eager"]
    assert command.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert "--enable-prompt-tokens-details" in command.argv  # answers say how many prompt tokens were cached
    assert command.env["KVMESH_ENGINE_PORT"] == "8001"  # the scheduler tells its daemon; the router finds it


def test_the_engine_port_is_vllms_default_without_one_and_prompt_details_can_be_turned_off() -> None:
    command = build_serve_command("m", ["--no-enable-prompt-tokens-details"], {})
    assert command.env["KVMESH_ENGINE_PORT"] == "8000"
    assert "--enable-prompt-tokens-details" not in command.argv


@pytest.mark.parametrize("overrides, fragment", [({"l1_size": "-5"}, "'l1_size'"), ({"chunksize": 1}, "'chunksize'")])
def test_bad_settings_fail_before_vllm_starts(overrides: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        build_serve_command("m", [], overrides)


def test_a_second_transfer_config_is_refused() -> None:
    with pytest.raises(ValueError, match="--set"):
        build_serve_command("m", ["--kv-transfer-config", "{}"], {})


def test_a_configured_or_disabled_disk_is_left_alone() -> None:
    for given in ({"disk_path": "/data/kv"}, {"disk_path": ""}):
        command = build_serve_command("m", [], given)
        transfer = json.loads(command.argv[command.argv.index("--kv-transfer-config") + 1])
        assert transfer["kv_connector_extra_config"]["disk_path"] == given["disk_path"]


def test_the_package_path_of_earlier_configurations_still_names_the_connector() -> None:
    import importlib

    package = importlib.import_module("kvmesh.integrations.vllm")
    from kvmesh.integrations.vllm.connector import KVMeshConnector

    assert package.KVMeshConnector is KVMeshConnector
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = package.Nope


def test_the_connector_refuses_a_policy_that_fails_requests_on_a_cache_fault() -> None:
    from kvmesh.integrations.vllm.connector import require_recompute_policy
    from kvmesh.integrations.vllm.serve import CONNECTOR

    require_recompute_policy(CONNECTOR["kv_load_failure_policy"])  # what kvmesh serve passes
    for policy in ("fail", None):
        with pytest.raises(ValueError, match="kv_load_failure_policy 'recompute', got"):
            require_recompute_policy(policy)


def test_loads_run_in_the_background_where_asked_and_by_default_only_on_cuda() -> None:
    from vllm.platforms import current_platform

    from kvmesh.config import KVMeshConfig
    from kvmesh.integrations.vllm.connector import loads_in_background

    assert loads_in_background(KVMeshConfig.from_mapping({"load_async": "on"}))
    assert not loads_in_background(KVMeshConfig.from_mapping({"load_async": "off"}))
    assert loads_in_background(KVMeshConfig.from_mapping({})) is bool(current_platform.is_cuda())
    with pytest.raises(ConfigError, match="load_async.*auto, on, off"):
        KVMeshConfig.from_mapping({"load_async": "yes"})


def test_secrets_reach_vllm_through_its_environment_not_its_command_line() -> None:
    """Every user of the machine reads every command line (ps): a Redis password or a tenant salt there leaks."""
    from kvmesh.config import KVMeshConfig

    url = "redis://kv:pa/ss@word@cache-host:6379/0"
    command = build_serve_command("m", [], {"redis_url": url, "tenant_salt": "acme-salt"})
    line = " ".join(command.argv)
    assert "pa/ss" not in line and "acme-salt" not in line
    assert command.env["KVMESH_REDIS_URL"] == url and command.env["KVMESH_TENANT_SALT"] == "acme-salt"
    transfer = json.loads(command.argv[command.argv.index("--kv-transfer-config") + 1])
    config = KVMeshConfig.load(transfer["kv_connector_extra_config"], env=command.env)  # as the connector reads it
    assert config.redis_url == url and config.tenant_salt == "acme-salt"


def test_a_model_with_recurrent_state_gets_prefill_steps_of_one_block_unless_the_user_chose(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NemotronHForCausalLM"]}))
    command = build_serve_command(str(tmp_path), ["--dtype", "float32"], {}, python="python")
    assert command.argv[-2:] == ["--max-num-batched-tokens", "128"]
    assert "recurrent state" in command.notes[0]
    chosen = build_serve_command(str(tmp_path), ["--dtype", "float32", "--max-num-batched-tokens=512"], {})
    assert "--max-num-batched-tokens" not in chosen.argv and chosen.notes == []
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert build_serve_command(str(tmp_path), ["--dtype", "float32"], {}).notes == []


def test_an_engine_that_blends_loads_through_kvmesh_and_runs_without_vllms_own_prefix_cache() -> None:
    blending = build_serve_command("m", ["--port", "8001"], {}, blend=True)
    assert blending.argv[-3:] == ["--load-format", "kvmesh", "--no-enable-prefix-caching"]
    assert any("opt in" in note for note in blending.notes)
    server_wide = build_serve_command("m", [], {"blend": "true"})  # the config key implies --blend
    assert "--no-enable-prefix-caching" in server_wide.argv and "kvmesh" in server_wide.argv
    plain = build_serve_command("m", [], {})
    assert "--load-format" not in plain.argv and "--no-enable-prefix-caching" not in plain.argv
    with pytest.raises(ValueError, match="--load-format kvmesh, got --load-format safetensors"):
        build_serve_command("m", ["--load-format", "safetensors"], {}, blend=True)
    with pytest.raises(ValueError, match="drop --enable-prefix-caching"):
        build_serve_command("m", ["--enable-prefix-caching"], {}, blend=True)
