"""Building the plugin manager and resolving what plugins registered.

``get_plugin_manager()`` registers the built-in plugins, then every entry point of the
``lmcache`` group, honouring two environment switches for operators and tests:

* ``LMCACHE_PLUGINS=a,b``: load only these entry points (by entry-point name);
* ``LMCACHE_DISABLE_PLUGINS=a,b``: load all but these.

Nothing is registered at import time.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import pluggy
from pydantic import BaseModel

from lmcache_core import hookspecs
from lmcache_core.codecs import CodecSpec, UnknownCodecError
from lmcache_core.errors import PluginError, UnknownLocationError
from lmcache_core.storage import BackendSpec
from lmcache_core.transport import TransportSpec

#: modules of lmcache_core that register through the same hooks as outside plugins
BUILTIN_PLUGINS: tuple[str, ...] = ("lmcache_core.controller.routes", "lmcache_core.controller.page")


def _names_from_env(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None or not raw.strip():
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def get_plugin_manager(
    *, load_entrypoints: bool = True, extra_plugins: Iterable[object] = ()
) -> pluggy.PluginManager:
    """A fresh manager with the built-ins, the installed plugins and ``extra_plugins``."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    if load_entrypoints:
        _load_entrypoints(pm)
    for plugin in extra_plugins:
        pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from exc
    return pm


def _load_entrypoints(pm: pluggy.PluginManager) -> None:
    allow = _names_from_env("LMCACHE_PLUGINS")
    for name in _names_from_env("LMCACHE_DISABLE_PLUGINS") or ():
        pm.set_blocked(name)  # pluggy's loader skips blocked names
    names: Iterable[str | None] = sorted(allow) if allow is not None else [None]
    for name in names:
        try:
            loaded = pm.load_setuptools_entrypoints(hookspecs.ENTRY_POINT_GROUP, name=name)
        except Exception as exc:
            raise PluginError(f"cannot load an 'lmcache' entry point: {exc}") from exc
        if name is not None and not loaded and pm.get_plugin(name) is None and not pm.is_blocked(name):
            installed = sorted({ep.name for ep in metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP)})
            raise PluginError(
                f"LMCACHE_PLUGINS names '{name}', but no 'lmcache' entry point has that name; "
                f"installed: {', '.join(installed) or '(none)'}"
            )


def _collect(pm: pluggy.PluginManager, hook_name: str) -> list[tuple[str, Any]]:
    """(plugin name, record) for every record every plugin returned from ``hook_name``."""
    out: list[tuple[str, Any]] = []
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        result = impl.function()
        for record in result or []:
            out.append((impl.plugin_name, record))
    return out


def _unique_by(
    pairs: list[tuple[str, Any]], attr: str, what: str
) -> dict[str, Any]:
    found: dict[str, Any] = {}
    owners: dict[str, str] = {}
    for plugin, record in pairs:
        name = getattr(record, attr)
        if name in found:
            raise PluginError(
                f"{what} '{name}' is registered by two plugins: '{owners[name]}' and '{plugin}'"
            )
        object.__setattr__(record, "plugin", plugin)
        found[name] = record
        owners[name] = plugin
    return found


def backend_specs(pm: pluggy.PluginManager) -> dict[str, BackendSpec]:
    """Every registered location by name, fastest tier first."""
    specs = _unique_by(_collect(pm, "lmcache_storage_backends"), "location", "location")
    return dict(sorted(specs.items(), key=lambda item: (item[1].tier, item[0])))


def resolve_location(pm: pluggy.PluginManager, name: str) -> BackendSpec:
    """The spec registered for location ``name``; ``UnknownLocationError`` lists the others."""
    specs = backend_specs(pm)
    if name not in specs:
        raise UnknownLocationError(name, list(specs))
    return specs[name]


def transport_specs(pm: pluggy.PluginManager) -> dict[str, TransportSpec]:
    return _unique_by(_collect(pm, "lmcache_transports"), "name", "transport")


def resolve_transport(pm: pluggy.PluginManager, name: str) -> TransportSpec:
    specs = transport_specs(pm)
    if name not in specs:
        listed = ", ".join(sorted(specs)) or "(none installed)"
        raise PluginError(f"unknown transport '{name}'; available: {listed}")
    return specs[name]


def codec_specs(pm: pluggy.PluginManager) -> dict[str, CodecSpec]:
    """Every registered chunk codec by name (sorted)."""
    specs = _unique_by(_collect(pm, "lmcache_chunk_codecs"), "name", "codec")
    return dict(sorted(specs.items()))


def resolve_codec(pm: pluggy.PluginManager, name: str) -> CodecSpec:
    """The codec registered as ``name``; ``UnknownCodecError`` lists the installed ones."""
    specs = codec_specs(pm)
    if name not in specs:
        raise UnknownCodecError(name, list(specs))
    return specs[name]


def settings_models(pm: pluggy.PluginManager) -> list[tuple[str, type[BaseModel]]]:
    """Every settings model plugins contribute, with the plugin that contributed it."""
    models: list[tuple[str, type[BaseModel]]] = list(_collect(pm, "lmcache_settings_models"))
    for plugin, spec in _collect(pm, "lmcache_storage_backends") + _collect(
        pm, "lmcache_transports"
    ):
        if spec.settings_model is not None:
            models.append((plugin, spec.settings_model))
    seen: set[type[BaseModel]] = set()
    unique = []
    for plugin, model in models:
        if model not in seen:
            seen.add(model)
            unique.append((plugin, model))
    return unique


def controller_routers(pm: pluggy.PluginManager) -> list[Any]:
    """Every APIRouter plugins contribute, built-ins first."""
    return [router for _, router in _collect(pm, "lmcache_controller_routes")]


def describe_plugins(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """Name, version, hooks and locations/transports of every loaded plugin (for the CLI)."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    backends = _collect(pm, "lmcache_storage_backends")
    transports = _collect(pm, "lmcache_transports")
    codecs = _collect(pm, "lmcache_chunk_codecs")
    out = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        dist = dists.get(id(plugin))
        out.append(
            {
                "name": name,
                "version": dist.version if dist is not None else _core_version(),
                "distribution": dist.metadata["Name"] if dist is not None else "lmcache-core",
                "hooks": sorted(h.name for h in pm.get_hookcallers(plugin) or []),
                "locations": sorted(s.location for p, s in backends if p == name),
                "transports": sorted(s.name for p, s in transports if p == name),
                "codecs": sorted(s.name for p, s in codecs if p == name),
            }
        )
    return out


def _core_version() -> str:
    try:
        return metadata.version("lmcache-core")
    except metadata.PackageNotFoundError:
        return "unknown"
