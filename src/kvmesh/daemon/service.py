"""The node daemon: owns L1 in shared memory and answers control messages on a Unix socket.

One daemon per (user, instance) on a node.  Engines' scheduler and worker
processes connect, map the segment it names, and move KV bytes through it
directly; the daemon only keeps the books (what is where, who reads what).
Whatever a connection reserved or pinned is given back when it closes, so a
crashed engine leaks nothing; entries promised to another process (a *lease*:
vLLM's scheduler pins what its worker will load) are freed by that process or
when the lease expires.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kvmesh import __version__, wire
from kvmesh.config import KVMeshConfig, masked
from kvmesh.daemon.affinity import use_every_core
from kvmesh.daemon.health import daemon_health, store_gauges
from kvmesh.daemon.metrics import DaemonMetrics, start_http
from kvmesh.daemon.requests import RequestBook
from kvmesh.daemon.status import status_snapshot
from kvmesh.entry import EntryMeta, EntryMetaError
from kvmesh.socket_dir import UntrustedPath, check_peer, open_private, peer_uid, private_dir
from kvmesh.store import LeaseTable, TieredStore
from kvmesh.store.build import build_lower_tiers
from kvmesh.store.quiet import QuietGate
from kvmesh.tiers.eviction import EVICTION_POLICIES
from kvmesh.tiers.memory import Extent, MemoryTier, ReserveStatus
from kvmesh.tiers.shm import SharedSegment
from kvmesh.wire import PROTOCOL_VERSION, ProtocolError, receive_message, send_message

log = logging.getLogger("kvmesh.daemon")


class DaemonAlreadyRunning(RuntimeError):
    """Another daemon holds this instance's lock."""


@dataclass(eq=False)
class _Session:
    """What one connection holds, to give back when it closes."""

    reserved: set[bytes] = field(default_factory=set)
    pinned: list[tuple[bytes, Extent]] = field(default_factory=list)
    engine: dict[str, Any] = field(default_factory=dict)  # what the client said it is (pid, model, fingerprint)


def _own_reservations(keys: list[bytes], session: _Session) -> Iterator[bytes]:
    """The keys this connection reserved, each handed out once (and no longer the session's to clean up)."""
    for key in keys:
        if key in session.reserved:
            session.reserved.discard(key)
            yield key


class NodeDaemon:
    def __init__(self, config: KVMeshConfig) -> None:
        self.config = config
        self.epoch = secrets.token_hex(8)  # changes at every start: offsets of an old segment mean nothing
        self.socket_path = config.socket_path()
        private_dir(self.socket_path.parent)  # this user's own, 0700, or refused (socket_dir.py)
        self._lock_file = os.fdopen(open_private(self.socket_path.with_suffix(".lock"), os.O_WRONLY | os.O_CREAT),
                                    "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise DaemonAlreadyRunning(f"a kvmesh daemon already serves {self.socket_path}") from None
        self.segment = SharedSegment.create(config.shm_name(), config.l1_size, prefault=config.l1_prefault)
        self.metrics = DaemonMetrics(lambda: self.store.stats(), lambda: store_gauges(self.store))
        # writes behind wait while engines are served (store/quiet.py says why)
        self.quiet = QuietGate(config.write_quiet_seconds)
        l1 = MemoryTier(config.l1_size, self.segment.buffer, policy=EVICTION_POLICIES[config.l1_eviction](),
                        keep_budget=int(config.l1_size * config.l1_pin_fraction))
        self.store = TieredStore(l1, build_lower_tiers(config, warm_up=True),
                                 None, self.metrics, config.write_queue_size, config.prefetch,
                                 config.prefetch_threads, prefetch_priority=config.prefetch_priority,  # type: ignore[arg-type]
                                 writer_priority=config.write_priority,  # type: ignore[arg-type]
                                 quiet_gate=self.quiet)
        self._store_lock = threading.Lock()  # guards the sessions; the store and the leases lock themselves
        self.leases = LeaseTable(self.store.release, config.lease_seconds)
        self._sessions: set[_Session] = set()  # connections that said which engine they serve
        self.requests = RequestBook()  # finished requests' summaries, their loads, who stored which prompt
        self._started = time.time()
        self.socket_path.unlink(missing_ok=True)
        self._server = _Server(str(self.socket_path), _Handler)
        self._server.daemon = self
        os.chmod(self.socket_path, 0o600)
        self._http = (start_http(config.http_host, config.http_port, self.metrics, self.health, self.status)
                      if config.http_port else None)

    def serve_forever(self) -> None:
        log.info("kvmesh daemon %s serving %s with L1 %d bytes (%s)", __version__, self.socket_path,
                 self.config.l1_size, self.segment.path)
        try:
            self._server.serve_forever(poll_interval=0.2)
        finally:
            self.close()

    def shutdown(self) -> None:
        threading.Thread(target=self._server.shutdown, daemon=True).start()

    def close(self) -> None:
        self.store.flush(timeout=30)  # finish writing behind what was stored before stopping
        self.store.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        self._server.server_close()
        self.socket_path.unlink(missing_ok=True)
        self.segment.unlink()
        self.segment.close()
        self._lock_file.close()

    def health(self) -> dict[str, Any]:
        """What is true now: L1 usable and how full, and each lower tier's state (``daemon.health``)."""
        return daemon_health(self.store, self.segment.path, {
            "version": __version__, "pid": os.getpid(), "instance": self.config.instance,
            "uptime_seconds": round(time.time() - self._started, 1)})

    def status(self) -> dict[str, Any]:
        """What the live status page shows (``daemon/status.py``)."""
        with self._store_lock:
            engines = [dict(s.engine) for s in self._sessions]
        return status_snapshot(self.health(), self.store.stats(), engines, self.requests.summaries(),
                               self.requests.recorded)

    # ----------------------------------------------------------------- requests
    def handle(self, message: dict[str, Any], session: _Session) -> dict[str, Any]:
        """Decode a request, call its ``_op_*`` handler, encode the reply (a malformed one raises ProtocolError)."""
        request = wire.decode_request(message)
        if session.engine:  # an engine at work: writes behind hold back (observers do not count)
            self.quiet.busy()
        handler = getattr(self, f"_op_{request.op}")
        self._expire_leases()
        return wire.encode_reply(handler(request, session))

    def _op_hello(self, request: wire.Hello, session: _Session) -> wire.HelloReply:
        """Who we are, where L1 lives, and the settings we run with (the client refuses a mismatch)."""
        if request.protocol != PROTOCOL_VERSION:
            raise wire.VersionMismatch(f"a client (pid {request.pid}) speaks protocol {request.protocol}, "
                                       f"this daemon {PROTOCOL_VERSION}", request.protocol, request.pid)
        if request.engine:
            session.engine = {"pid": request.pid, **request.engine}
            with self._store_lock:
                self._sessions.add(session)
        return wire.HelloReply(__version__, PROTOCOL_VERSION, os.getpid(), self.epoch, self.segment.name,
                               self.segment.size, self.config.daemon_digest(), masked(self.config.daemon_settings()))

    def _op_lookup(self, request: wire.Lookup, session: _Session) -> wire.LookupReply:
        """Consecutive hits from the first key, and the partial entries that could extend them.

        ``resident`` says whether a partial is in L1 now (one found below L1 starts promoting at once).
        """
        keys = [chunk.key for chunk in request.chunks]
        tokens = [chunk.tokens for chunk in request.chunks]
        located = self.store.locate(keys, prefetch=request.prefetch)
        hits = located.hits
        partials: list[wire.PartialFound] = []
        parent = keys[hits - 1] if hits else request.root
        if hits < len(keys) and request.partials and parent:
            rest = sum(tokens[hits:])  # the prompt's tokens after the hits
            partials = [wire.PartialFound(child, count, self.store.l1.contains(child))
                        for child, count in self.store.partials(parent, rest, prefetch=request.prefetch)]
        if session.engine and request.count and hits < len(keys):  # the engine computes the rest now
            self.quiet.expect(keys[hits:])
        if tokens and request.count:  # a request asking again while it waits is not counted twice
            self.metrics.lookups.inc()
            self.metrics.lookup_tokens.inc(sum(tokens))
            self.metrics.hit_tokens.inc(sum(tokens[:hits]))
        gone = self.store.evictions.history(keys[hits]) if hits < len(keys) else []
        below = sorted(located.below_l1)
        return wire.LookupReply(hits, partials, below, [wire.GoneFrom(g.tier, g.what, g.ago) for g in gone],
                                [located.found_in.get(index, "") for index in below], located.unavailable)

    def _op_reserve(self, request: wire.Reserve, session: _Session) -> wire.ReserveReply:
        for index, item in enumerate(request.items):  # all checked before any is reserved
            try:
                described = EntryMeta.decode(item.meta).nbytes
            except EntryMetaError as err:
                raise ProtocolError(f"reserve.items[{index}].meta: {err}") from None
            if item.nbytes != described:  # a client bug or version skew: never an extent of the wrong size
                raise ProtocolError(f"reserve.items[{index}].nbytes: {item.nbytes} bytes for an entry "
                                    f"whose description says {described}")
        results = []
        for item in request.items:
            reservation = self.store.reserve(item.key, item.nbytes, item.meta, item.parent, item.tokens,
                                             item.start, item.previous)
            if reservation.status is ReserveStatus.OK:
                session.reserved.add(item.key)
                results.append(wire.Reserved("ok", reservation.granted.offset))
            else:
                self.quiet.arrived([item.key])  # already stored, or no room: it will not be committed
                if reservation.status is ReserveStatus.NO_ROOM:
                    self.metrics.errors.labels("l1_no_room").inc()
                    self.store.evictions.record(item.key, "l1", "not stored (L1 had no room: pinned or in use)")
                results.append(wire.Reserved(reservation.status.value))
        return wire.ReserveReply(results)

    def _op_commit(self, request: wire.Commit, session: _Session) -> wire.Done:
        for key in _own_reservations(request.keys, session):
            self.store.commit(key)
        self.quiet.arrived(request.keys)
        if request.cost is not None:
            self.metrics.store_seconds.observe(request.cost.seconds)
            self.metrics.stored_bytes.inc(request.cost.nbytes)
            self.metrics.stored_tokens.inc(request.cost.tokens)
        return wire.Done()

    def _op_abort(self, request: wire.Abort, session: _Session) -> wire.Done:
        for key in _own_reservations(request.keys, session):
            self.store.abort(key)
        self.quiet.arrived(request.keys)
        return wire.Done()

    def _op_acquire(self, request: wire.Acquire, session: _Session) -> wire.AcquireReply:
        """Pin the longest available prefix of the keys, for this connection or as a lease."""
        pins = []
        promote = request.promote  # leases for engines never wait for a lower tier
        for key in request.keys:
            extent = self.store.acquire(key, promote=promote)
            if extent is None:
                break
            pins.append((key, extent))
        extents = [wire.ExtentRef(e.offset, e.nbytes, e.meta) for _, e in pins]
        if request.lease:
            return wire.AcquireReply(extents, self.leases.grant(pins))
        session.pinned.extend(pins)
        return wire.AcquireReply(extents)

    def _op_release(self, request: wire.Release, session: _Session) -> wire.Done:
        for item in request.items:
            pin = (item.key, Extent(item.offset, item.nbytes, item.meta))
            if pin in session.pinned:
                session.pinned.remove(pin)
                self.store.release(*pin)
        return wire.Done()

    def _op_release_lease(self, request: wire.ReleaseLease, session: _Session) -> wire.ReleaseLeaseReply:
        known = self.leases.give_back(request.lease)
        if (cost := request.cost) is not None:
            self.metrics.load_seconds.observe(cost.seconds)
            self.metrics.loaded_bytes.inc(cost.nbytes)
            self.metrics.loaded_tokens.inc(cost.tokens)
            self.metrics.verified_chunks.inc(cost.verified)
            self.metrics.verify_mismatches.inc(cost.mismatches)
            self.requests.loaded(cost.request_id, cost.rank, cost.seconds, cost.nbytes)
        return wire.ReleaseLeaseReply(known)

    def _op_report_error(self, request: wire.ReportError, session: _Session) -> wire.Done:
        self.metrics.errors.labels(request.kind[:64]).inc()
        return wire.Done()

    def _op_report_blend(self, request: wire.ReportBlend, session: _Session) -> wire.Done:
        self.metrics.blended_tokens.inc(max(0, request.tokens))
        self.metrics.blend_passages.inc(max(0, request.passages))
        self.metrics.blend_recomputed.inc(max(0, request.recomputed))
        self.metrics.blend_seconds.observe(max(0.0, request.seconds))
        return wire.Done()

    def _op_record_request(self, request: wire.RecordRequest, session: _Session) -> wire.RecordRequestReply:
        engine = session.engine.get("model", "") if session.engine else ""
        return wire.RecordRequestReply(self.requests.record(
            request.request_id, engine, request.summary, request.first_chunk, request.identity,
            request.stored_first_chunk))

    def _op_describe_entries(self, request: wire.DescribeEntries, session: _Session) -> wire.DescribeEntriesReply:
        return wire.DescribeEntriesReply([None if info is None else wire.EntryDescription(info.tier, info.nbytes,
                                                                                          info.age, info.codec)
                                          for info in self.store.describe(request.keys)])

    def _op_recent_requests(self, request: wire.RecentRequests, session: _Session) -> wire.RecentRequestsReply:
        return wire.RecentRequestsReply(self.requests.find(request.request_id, request.limit))

    def _op_delete(self, request: wire.Delete, session: _Session) -> wire.DeleteReply:
        return wire.DeleteReply(sum(self.store.delete(key) for key in request.keys))

    def _op_pin_entries(self, request: wire.PinEntries, session: _Session) -> wire.PinEntriesReply:
        if not request.seconds > 0:
            raise ProtocolError(f"pin_entries.seconds: a positive number of seconds, got {request.seconds!r}")
        result = self.store.l1.keep(request.keys, request.seconds)
        return wire.PinEntriesReply(result.kept, result.missing, result.over_budget)

    def _op_unpin_entries(self, request: wire.UnpinEntries, session: _Session) -> wire.UnpinEntriesReply:
        return wire.UnpinEntriesReply(self.store.l1.unkeep(None if request.every else request.keys))

    def _op_stats(self, request: wire.Stats, session: _Session) -> wire.StatsReply:
        if request.flush:
            self.store.flush()
        with self._store_lock:
            engines = [dict(s.engine) for s in self._sessions]
        return wire.StatsReply({name: stats.to_dict() for name, stats in self.store.stats().items()},
                               self.metrics.snapshot(), len(self.leases), masked(self.config.daemon_settings()),
                               engines)

    def _op_shutdown(self, request: wire.Shutdown, session: _Session) -> wire.Done:
        self.shutdown()
        return wire.Done()

    def _expire_leases(self) -> None:
        expired = self.leases.expire()
        if expired:
            self.metrics.errors.labels("lease_expired").inc(expired)

    def end_session(self, session: _Session) -> None:
        for key in session.reserved:
            self.store.abort(key)
        for key, extent in session.pinned:
            self.store.release(key, extent)
        session.reserved.clear()
        session.pinned.clear()
        with self._store_lock:
            self._sessions.discard(session)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    daemon: NodeDaemon


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        daemon: NodeDaemon = self.server.daemon  # type: ignore[attr-defined]
        session = _Session()
        sock: socket.socket = self.request
        try:
            check_peer(peer_uid(sock), "a client of this daemon")
        except UntrustedPath as err:
            log.warning("%s", err)
            return
        try:
            while True:
                try:
                    message = receive_message(sock)
                except OSError:  # closed, or not a framed message (wire.ConnectionClosed)
                    return
                try:
                    reply = daemon.handle(message, session)
                except ProtocolError as err:  # a malformed request or another protocol version: refused
                    log.warning("refused a request: %s", err)
                    reply = wire.encode_reply(wire.ErrorReply(f"{type(err).__name__}: {err}", pid=os.getpid()))
                except Exception as err:  # a bad request must not kill the daemon
                    log.exception("request %s failed", message.get("op"))
                    reply = wire.encode_reply(wire.ErrorReply(f"{type(err).__name__}: {err}", pid=os.getpid()))
                send_message(sock, reply)
        finally:
            daemon.end_session(session)


def run_daemon(config: KVMeshConfig) -> None:
    """Run in the foreground until SIGTERM/SIGINT or a shutdown message."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    use_every_core()  # before any thread: an engine's worker that started us may be bound to one core
    daemon = NodeDaemon(config)
    signal.signal(signal.SIGTERM, lambda *_: daemon.shutdown())
    signal.signal(signal.SIGINT, lambda *_: daemon.shutdown())
    daemon.serve_forever()

