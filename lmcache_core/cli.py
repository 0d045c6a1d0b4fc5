"""The ``lmcache`` command: operator tools (``lmcache plugins``, ``lmcache nats ...``).

Errors are printed on stderr without a traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lmcache_core import cli_nats
from lmcache_core.errors import LMCacheError


def _cmd_plugins(args: argparse.Namespace) -> int:
    from lmcache_core.plugins import describe_plugins, get_plugin_manager

    print(json.dumps(describe_plugins(get_plugin_manager()), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmcache", description="Operator tools of lmcache-core: loaded plugins, workers on the bus."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plugins = sub.add_parser("plugins", help="print every loaded plugin as JSON")
    plugins.set_defaults(func=_cmd_plugins)
    cli_nats.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LMCacheError as exc:
        print(f"lmcache: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
