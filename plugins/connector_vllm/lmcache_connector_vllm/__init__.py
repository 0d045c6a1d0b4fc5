"""vLLM v1 KV connector for lmcache-core (``LMCacheConnectorV1``).

Importing this package does not import vLLM; ``lmcache_connector_vllm.connector`` does.
"""

from __future__ import annotations

#: the name our ``vllm.general_plugins`` entry point registers with vLLM's connector factory
CONNECTOR_NAME = "LMCacheCoreConnectorV1"
CONNECTOR_MODULE = "lmcache_connector_vllm.connector"
CONNECTOR_CLASS = "LMCacheConnectorV1"

__all__ = ["CONNECTOR_CLASS", "CONNECTOR_MODULE", "CONNECTOR_NAME"]
