"""The control protocol on the daemon's Unix socket: typed messages, framed as a 4-byte length and JSON.

Only small control messages travel here (keys, offsets, counts); KV bytes move through the
shared-memory segment.  Every request and reply is a frozen dataclass below; ``wire_codec`` turns
them into JSON objects and back, refusing a malformed one with a :class:`ProtocolError` that names
the field.  A request is ``{"op": <its op>, **fields}``, a reply ``{"ok": true, **fields}`` or an
:class:`ErrorReply`.  ``hello`` carries both sides' :data:`PROTOCOL_VERSION`: a peer of another
version is refused before anything else is read.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from kvmesh.wire_codec import ConnectionClosed, ProtocolError, decode, encode

__all__ = ["PROTOCOL_VERSION", "ConnectionClosed", "ProtocolError", "VersionMismatch", "receive_message",
           "send_message"]

PROTOCOL_VERSION = 10  # bump on any change a client of the previous version would misread
_LENGTH = struct.Struct("<I")
MAX_MESSAGE = 64 * 1024 * 1024
R = TypeVar("R")


class VersionMismatch(ProtocolError):
    """The peer speaks another protocol version (an older client, or a daemon started by an older kvmesh)."""

    def __init__(self, message: str, protocol: object, pid: object) -> None:
        super().__init__(message)
        self.protocol = protocol
        self.pid = pid


# ------------------------------------------------------------------ records inside messages
@dataclass(frozen=True, slots=True)
class ChunkRef:
    """A chunk asked about: its key and how many prompt tokens it covers."""

    key: bytes
    tokens: int


@dataclass(frozen=True, slots=True)
class PartialFound:
    """A stored partial chunk that may continue the hits; ``resident``: in L1 now (else being promoted)."""

    key: bytes
    tokens: int
    resident: bool


@dataclass(frozen=True, slots=True)
class ReserveItem:
    """One extent to reserve; ``parent`` is set for a partial chunk (so a continuing prompt can find it).

    ``start``, ``tokens`` and ``previous`` (the chunk before this one in its prompt) say what the chunk is
    worth to L1's eviction (``tiers/eviction.py``).
    """

    key: bytes
    nbytes: int
    meta: str
    parent: bytes | None = None
    tokens: int = 0
    start: int = 0
    previous: bytes | None = None


@dataclass(frozen=True, slots=True)
class Reserved:
    """``status`` is ``ok`` (``offset`` is where to write), ``exists`` or ``no_room``."""

    status: str
    offset: int | None = None


@dataclass(frozen=True, slots=True)
class ExtentRef:
    """A pinned L1 entry: where it lies in the segment and its ``EntryMeta`` encoding."""

    offset: int
    nbytes: int
    meta: str


@dataclass(frozen=True, slots=True)
class PinRef:
    """A pin this connection holds, named to give it back."""

    key: bytes
    offset: int
    nbytes: int
    meta: str


# ------------------------------------------------------------------------------- replies
@dataclass(frozen=True, slots=True)
class Done:
    """The reply of a request that answers nothing but success."""


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A refused or failed request; ``protocol`` and ``pid`` let a client of any version say whom it met."""

    error: str
    protocol: int = PROTOCOL_VERSION
    pid: int = 0


@dataclass(frozen=True, slots=True)
class HelloReply:
    version: str
    protocol: int
    pid: int
    epoch: str  # changes at every daemon start: offsets from another epoch name nothing
    shm_name: str
    shm_size: int
    config_digest: str
    config: dict[str, Any]


@dataclass(frozen=True, slots=True)
class GoneFrom:
    """A tier lost a chunk: ``what`` happened (``evicted``, ``dropped as corrupt``) ``ago`` seconds ago."""

    tier: str
    what: str
    ago: float


@dataclass(frozen=True, slots=True)
class LookupReply:
    hits: int  # consecutive chunks found in any tier, from the first
    partials: list[PartialFound]
    below_l1: list[int]  # indexes (< hits) of chunks not in L1 yet: their promotion has started
    miss_gone: list[GoneFrom] = field(default_factory=list)  # where the first chunk not found went, oldest first
    below_l1_tiers: list[str] = field(default_factory=list)  # the tier holding each of below_l1, in its order
    unavailable: list[str] = field(default_factory=list)  # lower tiers not asked (circuit open) or that failed


@dataclass(frozen=True, slots=True)
class ReserveReply:
    results: list[Reserved]  # one per item, in order


@dataclass(frozen=True, slots=True)
class AcquireReply:
    extents: list[ExtentRef]  # the longest pinned prefix of the keys
    lease: str | None = None  # set when the pins were taken as a lease for another process


@dataclass(frozen=True, slots=True)
class ReleaseLeaseReply:
    known: bool  # False: the lease had expired or belongs to an older daemon


@dataclass(frozen=True, slots=True)
class DeleteReply:
    deleted: int


@dataclass(frozen=True, slots=True)
class EntryDescription:
    tier: str
    nbytes: int
    age: float  # seconds; -1: not known (tiers.base.EntryInfo says what it means per tier)
    codec: str


@dataclass(frozen=True, slots=True)
class DescribeEntriesReply:
    entries: list[EntryDescription | None]  # one per key, None where no tier holds it


@dataclass(frozen=True, slots=True)
class RecordRequestReply:
    summary: dict[str, Any]  # as the daemon keeps it (load time added, the namespace part that differs named)


@dataclass(frozen=True, slots=True)
class RecentRequestsReply:
    requests: list[dict[str, Any]]  # newest last


@dataclass(frozen=True, slots=True)
class PinEntriesReply:
    pinned: int  # entries kept in L1 from now on
    missing: int  # not in L1
    over_budget: int  # refused: past l1_pin_fraction of L1


@dataclass(frozen=True, slots=True)
class UnpinEntriesReply:
    unpinned: int


@dataclass(frozen=True, slots=True)
class StatsReply:
    tiers: dict[str, dict[str, Any]]
    metrics: dict[str, float]
    leases: int
    config: dict[str, Any]
    engines: list[dict[str, Any]]


# ------------------------------------------------------------------------------ requests
class Request(Generic[R]):
    """A request; ``op`` names it on the wire, ``reply`` is the type of its answer."""

    __slots__ = ()
    op: ClassVar[str]
    reply: ClassVar[type]


@dataclass(frozen=True, slots=True)
class Hello(Request[HelloReply]):
    """Open a session; ``engine`` (model, role, fingerprint) is listed in stats, ``config_digest`` checked."""

    op = "hello"
    reply = HelloReply
    protocol: int
    pid: int
    engine: dict[str, Any] = field(default_factory=dict)
    config_digest: str | None = None


@dataclass(frozen=True, slots=True)
class Lookup(Request[LookupReply]):
    """How many chunks from the first are stored; ``count`` False: a re-ask the metrics must not count.

    ``root`` is the parent of the namespace's first chunk (``keys.namespace_root``): partial chunks that
    follow no full hit are listed under it; empty: none are offered.  ``prefetch`` False: a probe (the
    router asking every node which prefix it holds) that starts no promotion and notes nothing for
    admission; only the node that gets the request should move anything.
    """

    op = "lookup"
    reply = LookupReply
    chunks: list[ChunkRef]
    partials: bool = True
    count: bool = True
    root: bytes = b""
    prefetch: bool = True


@dataclass(frozen=True, slots=True)
class Reserve(Request[ReserveReply]):
    op = "reserve"
    reply = ReserveReply
    items: list[ReserveItem]


@dataclass(frozen=True, slots=True)
class StoreCost:
    """What one engine save cost: its copy time, bytes and tokens (the store-latency metrics)."""

    seconds: float
    nbytes: int
    tokens: int


@dataclass(frozen=True, slots=True)
class LoadCost:
    """What one engine load cost, and how many loaded chunks were checked against the entry and differed."""

    seconds: float
    nbytes: int
    tokens: int
    verified: int = 0
    mismatches: int = 0
    request_id: str = ""  # the engine's request, whose summary the daemon adds this load to
    rank: int = 0  # ranks load in parallel (a request's load time is the slowest rank's)


@dataclass(frozen=True, slots=True)
class Commit(Request[Done]):
    """Make reserved, written extents visible; ``cost``: what writing them cost (no round trip of its own)."""

    op = "commit"
    reply = Done
    keys: list[bytes]
    cost: StoreCost | None = None


@dataclass(frozen=True, slots=True)
class Abort(Request[Done]):
    op = "abort"
    reply = Done
    keys: list[bytes]


@dataclass(frozen=True, slots=True)
class Acquire(Request[AcquireReply]):
    """Pin the longest stored prefix; ``lease``: for another process; ``promote`` False: L1 only, no waiting."""

    op = "acquire"
    reply = AcquireReply
    keys: list[bytes]
    lease: bool = False
    promote: bool = True


@dataclass(frozen=True, slots=True)
class Release(Request[Done]):
    op = "release"
    reply = Done
    items: list[PinRef]


@dataclass(frozen=True, slots=True)
class ReleaseLease(Request[ReleaseLeaseReply]):
    """Give a lease back; ``cost``: what the load under it cost (no round trip of its own)."""

    op = "release_lease"
    reply = ReleaseLeaseReply
    lease: str
    cost: LoadCost | None = None


@dataclass(frozen=True, slots=True)
class ReportError(Request[Done]):
    """A fault of the cache an engine met (counted in ``kvmesh_errors_total{kind}``)."""

    op = "report_error"
    reply = Done
    kind: str


@dataclass(frozen=True, slots=True)
class ReportBlend(Request[Done]):
    """One blended request: tokens materialized by blending (approximate: never counted as loaded), passages
    reused, tokens recomputed after the check layer, and the blend's time in the engine."""

    op = "report_blend"
    reply = Done
    tokens: int
    passages: int
    recomputed: int
    seconds: float


@dataclass(frozen=True, slots=True)
class RecordRequest(Request[RecordRequestReply]):
    """What the cache did for one finished request (``explain.Explanation``), kept in the daemon's recent list.

    ``first_chunk`` names the prompt's first chunk by its tokens alone (``keys.content_digest``) and
    ``identity`` the parts of the request's namespace (``SchedulerSide._identity``): the daemon remembers
    which namespaces stored which first chunks, so a prompt that missed from its first chunk is told which
    part of its namespace differs from one that stored the same tokens.  The reply is the summary as kept:
    with the load time the engine's workers reported under the request's id, and that reason.
    """

    op = "record_request"
    reply = RecordRequestReply
    request_id: str
    summary: dict[str, Any]
    first_chunk: bytes = b""
    identity: dict[str, str] = field(default_factory=dict)
    stored_first_chunk: bool = False  # this request stored its first chunk (the daemon indexes it)


@dataclass(frozen=True, slots=True)
class DescribeEntries(Request[DescribeEntriesReply]):
    """Where each entry is, its bytes, age and codec (``kvmesh explain --engine``): it moves nothing, and reads
    a lower tier for each key not in L1, so it is for tools, not engines."""

    op = "describe_entries"
    reply = DescribeEntriesReply
    keys: list[bytes]


@dataclass(frozen=True, slots=True)
class RecentRequests(Request[RecentRequestsReply]):
    """The last ``limit`` requests' summaries (only ``request_id``'s where it is given), newest last."""

    op = "recent_requests"
    reply = RecentRequestsReply
    request_id: str = ""
    limit: int = 20


@dataclass(frozen=True, slots=True)
class Delete(Request[DeleteReply]):
    op = "delete"
    reply = DeleteReply
    keys: list[bytes]


@dataclass(frozen=True, slots=True)
class PinEntries(Request[PinEntriesReply]):
    """Keep these L1 entries from eviction for ``seconds`` (a system prompt a user pinned)."""

    op = "pin_entries"
    reply = PinEntriesReply
    keys: list[bytes]
    seconds: float


@dataclass(frozen=True, slots=True)
class UnpinEntries(Request[UnpinEntriesReply]):
    """Let eviction have these entries again; ``every``: all pinned ones."""

    op = "unpin_entries"
    reply = UnpinEntriesReply
    keys: list[bytes]
    every: bool = False


@dataclass(frozen=True, slots=True)
class Stats(Request[StatsReply]):
    """Tiers, metrics, leases, settings, engines; ``flush`` first waits for the writes behind."""

    op = "stats"
    reply = StatsReply
    flush: bool = False


@dataclass(frozen=True, slots=True)
class Shutdown(Request[Done]):
    op = "shutdown"
    reply = Done


REQUESTS: dict[str, type[Request[Any]]] = {cls.op: cls for cls in (
    Hello, Lookup, Reserve, Commit, Abort, Acquire, Release, ReleaseLease,
    ReportError, ReportBlend, RecordRequest, RecentRequests, DescribeEntries, Delete, PinEntries, UnpinEntries,
    Stats, Shutdown)}


# ------------------------------------------------------------------------ encoding
def encode_request(request: Request[Any]) -> dict[str, Any]:
    return {"op": request.op, **encode(request)}


def decode_request(message: dict[str, Any]) -> Request[Any]:
    op = message.get("op")
    cls = REQUESTS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise ProtocolError(f"op: unknown op {op!r}")
    return decode(cls, message, cls.op, ignore=frozenset({"op"}))


def encode_reply(reply: Any) -> dict[str, Any]:
    return {"ok": not isinstance(reply, ErrorReply), **encode(reply)}


def decode_reply(message: dict[str, Any], cls: type[R], op: str) -> R | ErrorReply:
    """The reply to an ``op`` request: a ``cls``, or the daemon's :class:`ErrorReply`."""
    ok = message.get("ok")
    if ok is False:
        return decode(ErrorReply, message, f"{op} reply", ignore=frozenset({"ok"}))
    if ok is not True:
        raise ProtocolError(f"{op} reply.ok: expected true or false, got {ok!r}")
    return decode(cls, message, f"{op} reply", ignore=frozenset({"ok"}))


def check_version(message: dict[str, Any], peer: str, this: str) -> None:
    """Refuse a hello reply from a peer of another protocol version, before reading its other fields.

    Only ``protocol`` and ``pid`` are read: every version's hello reply and error reply carry both.
    """
    protocol = message.get("protocol")
    if protocol != PROTOCOL_VERSION:
        raise VersionMismatch(f"{peer} speaks protocol {protocol}, {this} {PROTOCOL_VERSION}",
                              protocol, message.get("pid"))


# ------------------------------------------------------------------------- framing
def send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _receive_exactly(sock: socket.socket, count: int) -> bytes:
    parts = bytearray()
    while len(parts) < count:
        piece = sock.recv(count - len(parts))
        if not piece:
            raise ConnectionClosed("connection closed")
        parts += piece
    return bytes(parts)


def receive_message(sock: socket.socket) -> dict[str, Any]:
    (length,) = _LENGTH.unpack(_receive_exactly(sock, _LENGTH.size))
    if length > MAX_MESSAGE:
        raise ConnectionClosed(f"message of {length} bytes exceeds the limit of {MAX_MESSAGE}")
    try:
        message = json.loads(_receive_exactly(sock, length))
    except ValueError as err:
        raise ConnectionClosed(f"message is not JSON: {err}") from None
    if not isinstance(message, dict):
        raise ConnectionClosed("message is not a JSON object")
    return message
