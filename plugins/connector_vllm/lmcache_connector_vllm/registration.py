"""The ``vllm.general_plugins`` entry point: makes ``LMCacheCoreConnectorV1`` a connector name.

vLLM loads general plugins in every process it starts (API server, engine core, workers), maybe
more than once per process, so ``register`` is idempotent. It registers our own name only:
vLLM's built-in ``LMCacheConnectorV1`` name (which imports the separate ``lmcache`` package)
is left exactly as vLLM defines it.
"""

from __future__ import annotations

from lmcache_core.errors import PluginError

from lmcache_connector_vllm import CONNECTOR_CLASS, CONNECTOR_MODULE, CONNECTOR_NAME


def register() -> None:
    """Register ``LMCacheCoreConnectorV1`` with vLLM's ``KVConnectorFactory`` (lazily loaded)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_CLASS)
    except ValueError:
        # already registered: fine when it is ours (a second load), an error when it is not
        existing = KVConnectorFactory.get_connector_class_by_name(CONNECTOR_NAME)
        if (existing.__module__, existing.__qualname__) != (CONNECTOR_MODULE, CONNECTOR_CLASS):
            raise PluginError(
                f"vLLM connector name '{CONNECTOR_NAME}' is already taken by "
                f"{existing.__module__}.{existing.__qualname__}"
            ) from None
