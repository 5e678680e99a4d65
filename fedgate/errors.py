"""The fedgate exception tree.

Every error fedgate raises on purpose derives from :class:`FedgateError`. Each class carries the
gRPC status a front end answers with (``grpc_status``, a ``grpc.StatusCode`` name, kept as a string
so that pure modules need not import grpc).

    FedgateError
    ├── ConfigError                  a config, route table or policy file is wrong (our side)
    │   └── UnknownPluginError       a plug-in name is not registered; lists the valid names
    ├── RouteError                   no route for a party / role
    ├── LocalError                   our own fault: store full, message too large, shutting down
    │   ├── StoreFullError
    │   ├── MessageTooLargeError
    │   └── ShuttingDownError
    ├── RemoteProtocolError          the peer sent something malformed (their fault)
    ├── PeerUnavailableError         the peer cannot be reached (network, TLS, refused)
    ├── RejectedError                the audit chain rejected a message (rule and detail)
    └── InvalidRequestError          a client request is malformed

Foreign exceptions (grpc, OS, pyverbs, GPU runtimes) are translated at the boundary into the most
specific class here, with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "FedgateError",
    "InvalidRequestError",
    "LocalError",
    "MessageTooLargeError",
    "PeerUnavailableError",
    "RejectedError",
    "RemoteProtocolError",
    "RouteError",
    "ShuttingDownError",
    "StoreFullError",
    "UnknownPluginError",
]


class FedgateError(Exception):
    """Base class of every error fedgate raises on purpose."""

    grpc_status: str = "INTERNAL"


class ConfigError(FedgateError):
    """A configuration, route table or policy file is invalid.

    ``path`` is the dotted path of the offending key (``proxy.listen``), ``source`` the file it came
    from when known.
    """

    grpc_status = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, path: str = "", source: str = "") -> None:
        self.path = path
        self.source = source
        self.message = message
        where = ":".join(part for part in (source, path) if part)
        super().__init__(f"{where}: {message}" if where else message)


class UnknownPluginError(ConfigError):
    """A plug-in name (congestion controller, carrier, HE backend, filter) is not registered."""

    def __init__(self, kind: str, name: str, valid: list[str], *, path: str = "", source: str = "") -> None:
        self.kind = kind
        self.name = name
        self.valid = sorted(valid)
        super().__init__(
            f"unknown {kind} {name!r}; valid names: {', '.join(self.valid)}", path=path, source=source
        )


class RouteError(FedgateError):
    """No route to the destination party / role."""

    grpc_status = "NOT_FOUND"


class LocalError(FedgateError):
    """Our own side cannot serve the request."""

    grpc_status = "UNAVAILABLE"


class StoreFullError(LocalError):
    """The durable store is out of space or over its configured quota."""

    grpc_status = "RESOURCE_EXHAUSTED"


class MessageTooLargeError(LocalError):
    """A message exceeds the configured size limit."""

    grpc_status = "RESOURCE_EXHAUSTED"


class ShuttingDownError(LocalError):
    """The gateway is draining and takes no new work."""

    grpc_status = "UNAVAILABLE"


class RemoteProtocolError(FedgateError):
    """The peer violated the protocol; only that connection is closed."""

    grpc_status = "INTERNAL"


class PeerUnavailableError(FedgateError):
    """A peer gateway or the next hop cannot be reached."""

    grpc_status = "UNAVAILABLE"


class RejectedError(FedgateError):
    """The audit chain rejected a message."""

    grpc_status = "PERMISSION_DENIED"

    def __init__(self, rule: str, detail: str) -> None:
        self.rule = rule
        self.detail = detail
        super().__init__(f"rejected by audit rule {rule!r}: {detail}")


class InvalidRequestError(FedgateError):
    """A client request is malformed or missing a required field."""

    grpc_status = "INVALID_ARGUMENT"
