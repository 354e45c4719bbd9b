"""The node daemon shares one L1 between processes."""

import subprocess
import sys

import pytest
import torch

from kvmesh.client import DaemonUnavailable, KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.daemon.service import DaemonAlreadyRunning, NodeDaemon
from kvmesh.entry import EntryMeta
from kvmesh.keys import chunk_keys, model_namespace, namespace_root
from polling import eventually

NS = model_namespace("test-model", "L4.H2.D32.bfloat16")


def _chunks(keys, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 2, k.num_tokens, 2, 32, generator=generator).to(torch.bfloat16) for k in keys]


def test_another_process_sees_what_this_one_stored(client: KVMeshClient, daemon_config: KVMeshConfig) -> None:
    keys = chunk_keys(list(range(5000, 5300)), NS, 64, include_partial=True)
    chunks = _chunks(keys)
    assert client.put(keys, chunks) == len(keys)
    code = """
import json, sys, torch
from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.keys import chunk_keys, model_namespace, namespace_root
config = KVMeshConfig.from_mapping(json.loads(sys.argv[1]))
keys = chunk_keys(list(range(5000, 5300)), model_namespace("test-model", "L4.H2.D32.bfloat16"), 64, True)
with KVMeshClient(config) as other:
    print(other.lookup(keys))
    for tensor in other.get(keys):
        sys.stdout.write(tensor.view(torch.uint8).numpy().tobytes().hex()[:64] + "\\n")
"""
    import json
    out = subprocess.run([sys.executable, "-c", code, json.dumps(daemon_config.to_dict())],
                         capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) == len(keys)
    assert out[1:] == [c.view(torch.uint8).numpy().tobytes().hex()[:64] for c in chunks]


def test_loads_return_identical_bytes_and_stop_at_first_miss(client: KVMeshClient) -> None:
    keys = chunk_keys(list(range(9000, 9256)), NS, 64)
    chunks = _chunks(keys, seed=3)
    client.put(keys[:2], chunks[:2])
    assert client.lookup(keys) == 2
    got = client.get(keys)
    assert len(got) == 2
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, chunks))
    assert client.put(keys[:2], chunks[:2]) == 0  # already stored: a no-op


def test_a_dead_clients_pins_and_reservations_are_given_back(client: KVMeshClient,
                                                           daemon_config: KVMeshConfig) -> None:
    keys = chunk_keys(list(range(7000, 7128)), NS, 64)
    client.put(keys[:1], _chunks(keys[:1]))
    code = """
import json, os, sys
from kvmesh.client import KVMeshClient
from kvmesh.config import KVMeshConfig
from kvmesh.keys import chunk_keys, model_namespace, namespace_root
from kvmesh.entry import EntryMeta
config = KVMeshConfig.from_mapping(json.loads(sys.argv[1]))
keys = chunk_keys(list(range(7000, 7128)), model_namespace("test-model", "L4.H2.D32.bfloat16"), 64)
c = KVMeshClient(config)
from kvmesh import wire
c._call(wire.Acquire([keys[0].digest]))
c.reserve(keys[1:], [EntryMeta("bfloat16", (4, 2, 64, 2, 32))])
os._exit(0)  # die holding a pin and a reservation
"""
    import json
    subprocess.run([sys.executable, "-c", code, json.dumps(daemon_config.to_dict())], check=True)
    # the daemon notices the closed connection on its own thread, soon after the process is gone: once it
    # has, the reservation is aborted and the chunk can be written
    assert eventually(lambda: client.put(keys[1:], _chunks(keys[1:])) == 1)
    assert client.delete(keys[:1]) == 1
    assert client.lookup(keys) == 0


def test_second_daemon_for_the_same_instance_is_refused(client: KVMeshClient,
                                                        daemon_config: KVMeshConfig) -> None:
    with pytest.raises(DaemonAlreadyRunning):
        NodeDaemon(daemon_config)
    assert client.lookup([]) == 0  # the first daemon still serves


def test_no_daemon_and_no_autostart_says_what_to_do(tmp_path) -> None:
    config = KVMeshConfig.from_mapping({"socket_dir": str(tmp_path), "instance": "absent",
                                        "autostart_daemon": False})
    with pytest.raises(DaemonUnavailable, match="kvmesh daemon"):
        KVMeshClient(config)


def test_daemon_reports_stats(client: KVMeshClient) -> None:
    stats = client.stats()["l1"]
    assert stats["capacity"] == 64 * 1024 * 1024
    assert 0 <= stats["bytes_used"] <= stats["capacity"]


def test_partial_chunks_are_offered_to_a_longer_prompt(client: KVMeshClient) -> None:
    tokens = list(range(20000, 20300))
    short = chunk_keys(tokens[:150], NS, 64, include_partial=True)  # 2 full + 22 tokens
    metas = [EntryMeta("bfloat16", (4, 2, k.num_tokens, 2, 32)) for k in short]
    slots = client.reserve(short, metas, [None, None, short[1].digest])
    client.commit([s for s in slots if s is not None])
    longer = chunk_keys(tokens, NS, 64, include_partial=True)
    found = client.lookup_with_partials(longer)
    assert found.hits == 2
    assert [(p.digest, p.tokens, p.resident) for p in found.partials] == [(short[2].digest, 22, True)]
    assert client.lookup_with_partials(longer, partials=False).partials == []


def test_a_prompt_shorter_than_a_chunk_is_offered_only_within_its_namespace(client: KVMeshClient) -> None:
    """The first partial chunk is indexed under its namespace's root: another tenant is offered none of it."""
    tenant_b = model_namespace("test-model", "L4.H2.D32.bfloat16", "tenant-b")
    tokens = list(range(21000, 21040))
    [short] = chunk_keys(tokens, NS, 64, include_partial=True)
    slots = client.reserve([short], [EntryMeta("bfloat16", (4, 2, 40, 2, 32))], [namespace_root(NS)])
    client.commit([s for s in slots if s is not None])
    longer = chunk_keys(tokens + [1, 2, 3], NS, 64, include_partial=True)
    found = client.lookup_with_partials(longer, root=namespace_root(NS))
    assert found.hits == 0 and [(p.digest, p.tokens) for p in found.partials] == [(short.digest, 40)]
    theirs = chunk_keys(tokens + [1, 2, 3], tenant_b, 64, include_partial=True)
    assert client.lookup_with_partials(theirs, root=namespace_root(tenant_b)).partials == []
    assert client.lookup_with_partials(longer).partials == []  # no root named: none offered


def _http_daemon_config(tmp_path, instance: str) -> tuple[KVMeshConfig, int]:
    from kvmesh.bench.servers import free_port

    port = free_port()
    return KVMeshConfig.from_mapping({"socket_dir": str(tmp_path), "instance": instance, "l1_size": "16MiB",
                                      "l1_prefault": False, "http_port": port}), port


def _get(port: int, path: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_http_endpoint_serves_metrics_and_health(tmp_path) -> None:
    import json as json_module

    config, port = _http_daemon_config(tmp_path, "http-test")
    with KVMeshClient(config) as http_client:
        try:
            keys = chunk_keys(list(range(300)), NS, 64)
            http_client.put(keys, _chunks(keys))
            http_client.lookup_with_partials(keys)
            metrics = _get(port, "/metrics")[1].decode()
            assert "kvmesh_hit_tokens_total 256.0" in metrics
            assert 'kvmesh_tier_entries{tier="l1"} 4.0' in metrics
            code, body = _get(port, "/health")
            health = json_module.loads(body)
            assert code == 200 and health["status"] == "ok" and health["l1"]["entries"] == 4
            assert health["l1"]["state"] == "up" and health["problems"] == [] and 0 < health["l1"]["fill"] < 1
        finally:
            http_client.shutdown_daemon()


def test_health_is_503_when_l1_is_gone_from_shared_memory(tmp_path) -> None:
    """A cleaner or a container restart removed the segment: no engine can map L1, and /health says so."""
    import json as json_module

    from kvmesh.tiers.shm import SHM_DIR

    config, port = _http_daemon_config(tmp_path, "health-gone")
    with KVMeshClient(config) as client:
        try:
            segment = SHM_DIR / client.segment.name
            segment.unlink()
            code, body = _get(port, "/health")
            report = json_module.loads(body)
            assert code == 503 and report["status"] == "unavailable" and report["l1"]["state"] == "unusable"
            assert report["problems"] == [f"L1's shared-memory segment {segment} is gone: engines cannot map it; "
                                          "restart the daemon"]
        finally:
            client.shutdown_daemon()


def test_an_l1_larger_than_dev_shm_is_refused_naming_the_setting_and_the_free_space(tmp_path) -> None:
    """On a container's 64 MiB /dev/shm an L1 of 1 GiB once started, and the first write past 64 MiB was a
    SIGBUS in whichever process wrote (the engine's worker included)."""
    import os

    from kvmesh.tiers.shm import SHM_DIR

    stats = os.statvfs(SHM_DIR)
    too_big = stats.f_bavail * stats.f_frsize + (1 << 30)
    config = KVMeshConfig.from_mapping({"socket_dir": str(tmp_path / "sock"), "instance": "shm-too-small",
                                        "l1_size": too_big, "l1_prefault": False, "http_port": 0})
    done = subprocess.run([sys.executable, "-m", "kvmesh.cli", "daemon", "--set", f"socket_dir={tmp_path / 'sock'}",
                           "--set", "instance=shm-too-small", "--set", f"l1_size={too_big}", "--set",
                           "l1_prefault=false", "--set", "http_port=0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    message = " ".join(done.stderr.split())
    assert "does not fit /dev/shm" in message and "GiB free of" in message and "l1_size" in message
    assert not (SHM_DIR / config.shm_name()).exists()  # nothing left behind


def test_a_spawned_daemons_command_line_and_replies_hold_no_secret(tmp_path) -> None:
    import os
    from pathlib import Path

    config = KVMeshConfig.from_mapping({"socket_dir": str(tmp_path / "sock"), "instance": "secrets",
                                        "l1_size": "16MiB", "l1_prefault": False, "http_port": 0,
                                        "tenant_salt": "tenant-secret-salt"})
    with KVMeshClient(config) as client:  # starts the daemon
        try:
            cmdline = Path(f"/proc/{client.daemon_pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            assert "kvmesh.daemon" in cmdline and "tenant-secret-salt" not in cmdline
            assert "tenant-secret-salt" not in str(client.info())
        finally:
            client.shutdown_daemon()
    assert os.environ.get("KVMESH_TENANT_SALT") is None


def test_a_daemon_started_from_a_thread_bound_to_one_core_runs_on_every_core(tmp_path) -> None:
    """vLLM binds each compute thread to a core; a daemon its worker starts must not inherit that one core."""
    import json
    import os

    from kvmesh.client.stop import stop_daemon

    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("needs two cores to tell one core from all")
    settings = {"socket_dir": str(tmp_path / "sock"), "instance": "cores", "l1_size": "16MiB",
                "l1_prefault": False, "http_port": 0}
    starter = ("import json, os, sys\n"
               f"os.sched_setaffinity(0, {{{min(allowed)}}})\n"
               "from kvmesh.client import KVMeshClient\n"
               "from kvmesh.config import KVMeshConfig\n"
               "print(KVMeshClient(KVMeshConfig.from_mapping(json.loads(sys.argv[1]))).daemon_pid)\n")
    config = KVMeshConfig.from_mapping(settings)
    try:
        done = subprocess.run([sys.executable, "-c", starter, json.dumps(settings)], capture_output=True,
                              text=True, timeout=60, check=True)
        assert os.sched_getaffinity(int(done.stdout.split()[-1])) == allowed
    finally:
        stop_daemon(config)


def test_stopping_a_daemon_that_holds_its_lock_but_cannot_be_asked_says_why(tmp_path) -> None:
    import fcntl

    from kvmesh.client.stop import stop_daemon

    config = KVMeshConfig.from_mapping({"socket_dir": str(tmp_path), "instance": "stuck", "autostart_daemon": False})
    lock = config.socket_path().with_suffix(".lock")
    with open(lock, "a") as held:  # as a daemon that is starting (or of another version) holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(TimeoutError, match=r"could not be stopped within 0.3 s: .*kvmesh daemon"):
            stop_daemon(config, timeout=0.3)


def test_pinned_chunks_stay_in_l1_through_a_flood_within_the_pin_budget(tmp_path) -> None:
    """An 8 MiB L1 pins at most a quarter of itself (l1_pin_fraction): of 1 MiB chunks, two; the flood of
    other prompts evicts everything else; unpinned, the pinned ones go too."""
    config = KVMeshConfig.from_mapping({"socket_dir": str(tmp_path), "instance": "pins", "l1_size": "8MiB",
                                        "l1_prefault": False, "http_port": 0})
    system = chunk_keys(list(range(9000, 9000 + 3 * 1024)), NS, 1024)
    with KVMeshClient(config) as client:
        try:
            client.put(system, [torch.zeros(4, 2, 1024, 2, 32, dtype=torch.bfloat16)] * 3)
            reply = client.pin(system, seconds=600)
            assert (reply.pinned, reply.missing, reply.over_budget) == (2, 0, 1)
            for start in range(20_000, 20_000 + 12 * 1024, 1024):  # twelve more chunks through an 8-chunk L1
                flood = chunk_keys(list(range(start, start + 1024)), NS, 1024)
                client.put(flood, [torch.ones(4, 2, 1024, 2, 32, dtype=torch.bfloat16)])
            assert client.lookup(system) == 2  # the pinned two; the third was evicted
            l1 = client.stats()["l1"]
            assert (l1["pinned_entries"], l1["pinned_bytes"]) == (2, 2 * 1024 * 1024)
            assert client.unpin(system[:1]) == 1 and client.unpin(every=True) == 1
            for start in range(40_000, 40_000 + 8 * 1024, 1024):
                client.put(chunk_keys(list(range(start, start + 1024)), NS, 1024),
                           [torch.ones(4, 2, 1024, 2, 32, dtype=torch.bfloat16)])
            assert client.lookup(system) == 0
        finally:
            client.shutdown_daemon()
