"""The errors a client of the node daemon raises, split by what the engine does with them.

A :class:`CacheFault` is a fault of the cache (a miss or a reported load failure); a
:class:`DaemonError` is a refusal or a bug and must reach the engine's log.
"""

from __future__ import annotations


class CacheFault(Exception):
    """A fault of the cache, not of its caller: the engine treats it as a miss or a reported load failure.

    Everything else a client call raises (a refused request, a bug on either side) is not a cache fault
    and must not be turned into a miss.
    """


class DaemonUnavailable(CacheFault, ConnectionError):
    """No node daemon answers, and none could be started (or the connection to it was lost)."""


class LeaseLost(CacheFault):
    """A lease expired, or belongs to a daemon that has restarted since: its pages may no longer be read."""


class DaemonError(RuntimeError):
    """The daemon refused a request or failed on it: a bug or a version skew, never a cache miss."""


class ConfigMismatch(DaemonError):
    """The running daemon was started with other settings than this client asks for."""
