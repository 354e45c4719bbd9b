"""``python -m kvmesh.server [--config-json JSON]``: run the node daemon (what clients auto-start)."""

from __future__ import annotations

import argparse
import json
import sys

from kvmesh.config import ConfigError, KVMeshConfig
from kvmesh.server.daemon import DaemonAlreadyRunning, run_daemon


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmesh.server")
    parser.add_argument("--config-json", default="{}", help="kvmesh config keys as a JSON object")
    args = parser.parse_args()
    try:
        config = KVMeshConfig.load(json.loads(args.config_json))
        run_daemon(config)
    except ConfigError as err:
        print(f"kvmesh server: {err}", file=sys.stderr)
        return 2
    except DaemonAlreadyRunning as err:
        print(f"kvmesh server: {err}", file=sys.stderr)
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
