"""The controller's built-in HTTP endpoints, contributed through ``lmcache_controller_routes``."""

from __future__ import annotations

from typing import Any

from lmcache_core.hookspecs import hookimpl


@hookimpl
def lmcache_controller_routes() -> list[Any]:
    return []  # filled in by the controller issue
