"""llmaas: an on-device LLM system service. `llmaas.Client` talks to a running `llmaas serve`.

The client is imported on first use, not with the package: the engine's processes import `llmaas.*` too, and the
client's HTTP stack (httpx, which pulls in click and rich) cost them 0.13 s and 9 MB of resident memory at start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmaas.client import CallReply, Client, ServiceError

__all__ = ["CallReply", "Client", "ServiceError"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from llmaas import client

        return getattr(client, name)
    raise AttributeError(f"module 'llmaas' has no attribute {name!r}")
