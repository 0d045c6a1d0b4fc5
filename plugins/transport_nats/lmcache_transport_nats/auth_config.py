"""``python -m lmcache_transport_nats.auth_config [--config FILE]``: print the nats-server
configuration (an ``authorization`` block, as JSON, which nats-server reads) with the bus users
and roles the controller's settings describe, for NATS servers the controller does not start.

Errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lmcache_core.cli import run_cli
from lmcache_core.config import load_settings
from lmcache_core.errors import ConfigError
from lmcache_core.plugins import get_plugin_manager
from lmcache_transport_nats.auth import CREDENTIAL_KEYS, authorization

PROG = "python -m lmcache_transport_nats.auth_config"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the nats-server configuration (``authorization`` only) for the given settings."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Print a nats-server configuration (JSON) with the fleet's bus users and roles.",
    )
    parser.add_argument("--config", help="the controller's settings YAML (default: $LMCACHE_CONFIG_FILE)")
    args = parser.parse_args(argv)

    def run() -> int:
        block = authorization(load_settings(get_plugin_manager(), config_file=args.config))
        if block is None:
            raise ConfigError(f"no bus credentials in the settings: set {CREDENTIAL_KEYS}")
        print(json.dumps({"authorization": block}, indent=2))
        return 0

    return run_cli(PROG, run)


if __name__ == "__main__":
    sys.exit(main())

