"""The ``lmcache`` command: operator tools (``lmcache plugins``, ``lmcache nats ...``,
``lmcache controller ...``).

Errors are printed on stderr without a traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from lmcache_core import cli_controller, cli_nats
from lmcache_core.errors import find_lmcache_error


def _cmd_plugins(args: argparse.Namespace) -> int:
    from lmcache_core.plugins import describe_plugins, get_plugin_manager

    print(json.dumps(describe_plugins(get_plugin_manager()), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmcache",
        description="Operator tools of lmcache-core: loaded plugins, workers on the bus, the controller's API.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plugins = sub.add_parser("plugins", help="print every loaded plugin as JSON")
    plugins.set_defaults(func=_cmd_plugins)
    cli_nats.register(sub)
    cli_controller.register(sub)
    return parser


def run_cli(prog: str, call: Callable[[], int | None]) -> int:
    """Run a command's body: an ``LMCacheError`` (also one inside an exception group) becomes
    one line on stderr and exit status 2, Ctrl-C exit status 130; anything else propagates."""
    try:
        return int(call() or 0)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        found = find_lmcache_error(exc)
        if found is None:
            raise
        print(f"{prog}: error: {found}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("lmcache", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
