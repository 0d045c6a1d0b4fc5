"""Every hook of the ``lmcache`` plugin system.

Registration hooks are synchronous and do no I/O: they return typed records and the core does
the rest (name resolution, conflicts, settings). Async behaviour lives on the objects the
records' factories build.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy
from pydantic import BaseModel

if TYPE_CHECKING:
    from lmcache_core.codecs import CodecSpec
    from lmcache_core.storage import BackendSpec
    from lmcache_core.transport import TransportSpec

PROJECT_NAME = "lmcache"
ENTRY_POINT_GROUP = "lmcache"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def lmcache_storage_backends() -> list["BackendSpec"]:
    """Storage locations this plugin provides.

    Called once when the plugin manager is built. Return one ``BackendSpec`` per location; a
    location name claimed by two plugins is an error naming both.

    Example::

        @hookimpl
        def lmcache_storage_backends():
            return [BackendSpec("LocalCPUBackend", factory=CPUBackend.from_settings, tier=0)]
    """


@hookspec
def lmcache_transports() -> list["TransportSpec"]:
    """Message-bus transports (between workers and the controller) this plugin provides.

    Example::

        @hookimpl
        def lmcache_transports():
            return [TransportSpec("nats", connect=connect_nats, embedded_server=run_nats_server)]
    """


@hookspec
def lmcache_controller_routes() -> list[Any]:
    """FastAPI ``APIRouter``s to mount on the controller's HTTP API.

    The built-in endpoints (``/lookup``, ``/clear`` ...) come through this hook too. Handlers
    reach the running controller with ``lmcache_core.controller.deps.get_controller``.

    Example::

        @hookimpl
        def lmcache_controller_routes():
            router = APIRouter()
            router.get("/hello")(lambda: {"hello": "world"})
            return [router]
    """


@hookspec
def lmcache_settings_models() -> list[type[BaseModel]]:
    """Extra configuration keys, as pydantic models whose fields join the root settings.

    Field names must be unique across plugins (prefix them with the plugin's name); each field
    needs a type, a default and a description. Backend and transport specs may instead carry
    their own ``settings_model``.

    Example::

        class NatsSettings(BaseModel):
            nats_subject_prefix: str = Field("lmcache", description="...")

        @hookimpl
        def lmcache_settings_models():
            return [NatsSettings]
    """


@hookspec
def lmcache_chunk_codecs() -> list["CodecSpec"]:
    """Chunk codecs (named encodings that store a chunk in fewer bytes) this plugin provides.

    Called when an engine starts and whenever a codec is looked up by name. Return one
    ``CodecSpec`` per codec: its name, ``encode``/``decode`` functions, whether it is lossless
    and which dtypes it accepts. A name claimed by two plugins is an error naming both; an
    unknown name (``/compress`` with ``method: "zstdd"``) lists the installed ones.

    Example::

        @hookimpl
        def lmcache_chunk_codecs():
            return [CodecSpec("zstd", encode=zstd_encode, decode=zstd_decode, lossless=True)]
    """
