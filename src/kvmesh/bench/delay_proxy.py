"""A TCP proxy on loopback that delays what the server sends back: a slow Redis, for tests and the soak.

Everything a client sends goes through at once; every piece the server answers is held ``delay`` seconds
(settable while it runs) before it is passed on.  A server that is down (a Redis being restarted) closes
the client's connection, as a refused connection would, and the proxy keeps accepting.  Threads only,
stopped with the proxy.
"""

from __future__ import annotations

import socket
import threading
import time

from kvmesh.bench.servers import free_port


class DelayProxy:
    def __init__(self, target_port: int, delay: float = 0.0) -> None:
        self.target_port = target_port
        self.delay = delay
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="delay-proxy").start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            sockets, self._sockets = [self._listener, *self._sockets], []
        for sock in sockets:
            _close(sock)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                server.settimeout(None)
            except OSError:
                _close(client)  # the server is down: the client sees its connection closed
                continue
            with self._lock:
                self._sockets = [s for s in self._sockets if s.fileno() != -1] + [client, server]
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, delayed: bool) -> None:
        try:
            while data := source.recv(65536):
                if delayed and self.delay:
                    time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
