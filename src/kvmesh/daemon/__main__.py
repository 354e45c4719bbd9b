"""``python -m kvmesh.daemon [--config-stdin | --config-json JSON] [--detach]``: run the node daemon.

``--detach`` (what clients use to auto-start one) forks and lets the parent
exit at once, so the daemon is nobody's child: an engine that kills its own
process tree on shutdown (vLLM does) leaves the node's cache running.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmesh.daemon")
    parser.add_argument("--config-json", default="{}", help="kvmesh config keys as a JSON object")
    parser.add_argument("--config-stdin", action="store_true",
                        help="read the config keys as a JSON object from standard input (what clients use: "
                             "secrets never appear in a command line)")
    parser.add_argument("--detach", action="store_true", help="fork into the background and return at once")
    args = parser.parse_args()
    settings = sys.stdin.read() if args.config_stdin else args.config_json
    if args.detach:
        if os.fork() > 0:
            os._exit(0)
        os.setsid()

    from kvmesh.config import ConfigError, KVMeshConfig
    from kvmesh.daemon.service import DaemonAlreadyRunning, run_daemon
    from kvmesh.socket_dir import UntrustedPath
    from kvmesh.tiers.encrypted import KeyringError
    from kvmesh.tiers.shm import SharedMemoryTooSmall

    try:
        config = KVMeshConfig.load(json.loads(settings))
        run_daemon(config)
    except ConfigError as err:
        print(f"kvmesh daemon: {err}", file=sys.stderr)
        return 2
    except DaemonAlreadyRunning as err:
        print(f"kvmesh daemon: {err}", file=sys.stderr)
        return 0
    except (SharedMemoryTooSmall, UntrustedPath) as err:
        print(f"kvmesh daemon: {err.strerror or err}", file=sys.stderr)
        return 1
    except KeyringError as err:
        print(f"kvmesh daemon: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
