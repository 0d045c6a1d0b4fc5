"""``python -m lmcache_transport_nats.auth_config [--config FILE]``: print the nats-server
configuration (an ``authorization`` block, as JSON, which nats-server reads) with the bus users
and roles the controller's settings describe, for NATS servers the controller does not start.
``--new-nkey FILE`` writes a new nkey seed there (mode 0600) and prints its public key: the
seed file is the instance's ``nats_nkey_seed_file``, the public key goes into the controller's
``nats_instance_nkeys``.

Errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lmcache_core.cli import run_cli
from lmcache_core.config import load_settings
from lmcache_core.errors import ConfigError
from lmcache_core.plugins import get_plugin_manager
from lmcache_transport_nats.auth import CREDENTIAL_KEYS, authorization, new_nkey

PROG = "python -m lmcache_transport_nats.auth_config"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the nats-server configuration (``authorization`` only) for the given settings."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Print a nats-server configuration (JSON) with the fleet's bus users and roles.",
    )
    parser.add_argument("--config", help="the controller's settings YAML (default: $LMCACHE_CONFIG_FILE)")
    parser.add_argument(
        "--new-nkey", metavar="FILE", type=Path,
        help="instead: write a new nkey seed to FILE (mode 0600) and print its public key",
    )
    args = parser.parse_args(argv)

    def run() -> int:
        if args.new_nkey is not None:
            print(new_nkey(args.new_nkey))
            return 0
        block = authorization(load_settings(get_plugin_manager(), config_file=args.config))
        if block is None:
            raise ConfigError(f"no bus credentials in the settings: set {CREDENTIAL_KEYS}")
        print(json.dumps({"authorization": block}, indent=2))
        return 0

    return run_cli(PROG, run)


if __name__ == "__main__":
    sys.exit(main())

