"""The engine's side of the node daemon: what an engine process uses to reach L1.

``daemon_client.py`` holds :class:`KVMeshClient` (typed requests over the Unix socket, KV bytes through the
shared-memory segment), ``spawn.py`` starts a daemon when none answers, ``faults.py`` names what can go
wrong (a :class:`CacheFault` is a miss; anything else is not).
"""

from kvmesh.client.daemon_client import (
    KVMeshClient,
    Lease,
    LookupResult,
    PartialCandidate,
    ReadSlot,
    WriteSlot,
)
from kvmesh.client.faults import CacheFault, ConfigMismatch, DaemonError, DaemonUnavailable, LeaseLost
from kvmesh.client.spawn import socket_is_live

__all__ = ["CacheFault", "ConfigMismatch", "DaemonError", "DaemonUnavailable", "KVMeshClient", "Lease",
           "LeaseLost", "LookupResult", "PartialCandidate", "ReadSlot", "WriteSlot", "socket_is_live"]
