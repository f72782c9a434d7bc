"""llmaas: an on-device LLM system service. `llmaas.Client` talks to a running `llmaas serve`."""

from llmaas.client import CallReply, Client, ServiceError

__all__ = ["CallReply", "Client", "ServiceError"]
