"""The appliance's one typed configuration tree, loaded from ``fedgate.toml``.

Each component receives only its own section (``config.front``, ``config.store``, ...), never the
whole tree. Relative paths are taken relative to the working directory of the process (systemd sets
it to the state directory). Every section and field has a default, so an empty file is valid.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Literal

from fedgate.audit.config import AuditConfig
from fedgate.compute.config import ComputeConfig
from fedgate.configtree import bounds, build, load_toml
from fedgate.congestion.config import QuicConfig
from fedgate.errors import ConfigError
from fedgate.rdma.config import RdmaConfig

__all__ = [
    "FedgateConfig",
    "FrontConfig",
    "GatewayConfig",
    "LinkConfig",
    "LogConfig",
    "MetricsConfig",
    "RoutesConfig",
    "StoreConfig",
    "TlsConfig",
    "load_config",
    "parse_hostport",
]

K_MIB = 1024 * 1024  # bytes


def parse_hostport(text: str, *, path: str = "", source: str = "") -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too); a bad value is a ConfigError naming ``path``."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
        raise ConfigError(f"expected host:port, got {text!r}", path=path, source=source)
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range 0..65535", path=path, source=source)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Who this gateway is."""

    party_ids: tuple[str, ...] = field(default=("9999",), metadata=bounds(nonempty=True))
    """The FATE party ids this gateway serves; messages to them are stored locally."""
    name: str = ""
    """A name for logs and metrics; defaults to ``fedgate-<first party id>``."""
    datacenter: str = ""
    """Datacenter label; ``transport = "auto"`` picks RDMA towards endpoints with the same label."""
    drain_timeout_s: float = field(default=10.0, metadata=bounds(ge=0))
    """Seconds a graceful shutdown waits for in-flight calls before cancelling them."""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """This gateway's TLS identity, used by the link and, when set, the FATE-facing front."""

    ca_file: pathlib.Path | None = None
    """PEM bundle of the CA(s) that sign peer gateways' certificates."""
    cert_file: pathlib.Path | None = None
    """PEM certificate of this gateway (party id in the subject CN or a SAN)."""
    key_file: pathlib.Path | None = None
    """PEM private key of ``cert_file``."""
    front: bool = False
    """Serve the FATE-facing gRPC front over TLS too (FATE workers usually connect in plain text)."""


@dataclass(frozen=True, slots=True)
class FrontConfig:
    """The FATE-facing gRPC server (OSX PrivateTransferTransport and rollsite DataTransferService)."""

    listen: str = "127.0.0.1:9370"
    """host:port the FATE workers connect to."""
    max_message_bytes: int = field(default=256 * K_MIB, metadata=bounds(ge=1024, le=2**31 - 1))
    """Largest gRPC message accepted from a worker, in bytes."""
    max_pop_wait_s: float = field(default=36000.0, metadata=bounds(gt=0))
    """Upper bound on a pop's long-poll, in seconds (FATE asks for 36,000 s)."""
    forward_timeout_s: float = field(default=60.0, metadata=bounds(gt=0))
    """Deadline of a synchronous forward to a peer gateway or next hop, in seconds."""
    control_timeout_s: float = field(default=10.0, metadata=bounds(gt=0))
    """Deadline of FATE-Flow control calls when the caller set none, in seconds."""


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """The gateway-to-gateway link (store-and-forward)."""

    listen: str = "127.0.0.1:9371"
    """host:port the link receiver listens on for peer gateways."""
    connect_timeout_s: float = field(default=10.0, metadata=bounds(gt=0))
    """Seconds to establish a link connection, TLS and handshake included."""
    backoff_initial_s: float = field(default=0.2, metadata=bounds(gt=0))
    """First reconnect delay, in seconds; doubles (with jitter) on each failure."""
    backoff_max_s: float = field(default=30.0, metadata=bounds(gt=0))
    """Largest reconnect delay, in seconds."""
    keepalive_s: float = field(default=10.0, metadata=bounds(gt=0))
    """Idle seconds before a keepalive; three missed ones close the link."""
    chunk_bytes: int = field(default=1 * K_MIB, metadata=bounds(ge=4096, le=64 * K_MIB))
    """Payload chunk size on the link, in bytes (the unit of resume)."""
    window_bytes: int = field(default=64 * K_MIB, metadata=bounds(ge=64 * 1024))
    """Unacknowledged bytes in flight per link (credit window)."""
    insecure: bool = False
    """Allow plain-text links (tests and trusted labs only); otherwise mTLS is required."""
    quic: bool = True
    """Also accept QUIC links on the same port number (UDP)."""
    rdma_listen: str = ""
    """host:port of the RDMA carrier's control listener; empty: no RDMA links accepted."""
    lanes_per_peer: int = field(default=1, metadata=bounds(ge=1, le=16))
    """Links per peer gateway, side by side; messages are spread over them by (session, topic), so
    each topic keeps its order. Over QUIC each lane is its own connection (and with
    ``quic.workers``, its own process): more than one when one core cannot carry a peer's traffic.
    Every peer must run a fedgate that knows lanes (HELLO capability ``lanes``)."""


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """The embedded durable store (SQLite in WAL mode)."""

    path: pathlib.Path = pathlib.Path("var/fedgate.db")
    """Database file; its directory is created if missing."""
    max_bytes: int = field(default=64 * 1024 * K_MIB, metadata=bounds(ge=K_MIB))
    """Quota of queued payload bytes; pushes beyond it fail with RESOURCE_EXHAUSTED."""
    min_free_bytes: int = field(default=256 * K_MIB, metadata=bounds(ge=0))
    """Free disk space kept in reserve; pushes that would eat into it fail."""
    commit_interval_s: float = field(default=0.002, metadata=bounds(ge=0, le=1))
    """How long the writer waits to batch more writes into one commit, in seconds."""
    synchronous: Literal["full", "normal"] = "normal"
    """SQLite ``synchronous`` level; ``normal`` in WAL survives a process crash, ``full`` power loss."""


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus endpoint."""

    listen: str = "127.0.0.1:9372"
    """host:port of the /metrics HTTP endpoint; empty disables it."""


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Structured logs to stderr (journald picks them up)."""

    format: Literal["plain", "json"] = "plain"
    """``plain`` for people, ``json`` for log shippers."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level written."""


@dataclass(frozen=True, slots=True)
class RoutesConfig:
    """Where the route table lives and how it reloads."""

    file: pathlib.Path = pathlib.Path("conf/route_table.json")
    """Route table in rollsite or OSX JSON format (with fedgate's per-endpoint extensions)."""
    poll_interval_s: float = field(default=0.5, metadata=bounds(gt=0, le=60))
    """How often the file's mtime/size is checked for changes, in seconds."""


@dataclass(frozen=True, slots=True)
class FedgateConfig:
    """The whole appliance configuration."""

    gateway: GatewayConfig = GatewayConfig()
    front: FrontConfig = FrontConfig()
    link: LinkConfig = LinkConfig()
    store: StoreConfig = StoreConfig()
    tls: TlsConfig = TlsConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    routes: RoutesConfig = RoutesConfig()
    audit: AuditConfig = AuditConfig()
    quic: QuicConfig = QuicConfig()
    rdma: RdmaConfig = RdmaConfig()
    compute: ComputeConfig = ComputeConfig()

    def validate(self, *, source: str = "") -> None:
        """Cross-field checks that a single field's type cannot express."""
        parse_hostport(self.front.listen, path="front.listen", source=source)
        parse_hostport(self.link.listen, path="link.listen", source=source)
        if self.link.rdma_listen:
            parse_hostport(self.link.rdma_listen, path="link.rdma_listen", source=source)
        if self.metrics.listen:
            parse_hostport(self.metrics.listen, path="metrics.listen", source=source)
        tls_files = (self.tls.cert_file, self.tls.key_file)
        if any(tls_files) and not all(tls_files):
            raise ConfigError("cert_file and key_file must be set together", path="tls", source=source)
        if self.tls.front and not self.tls.cert_file:
            raise ConfigError("front = true needs cert_file and key_file", path="tls.front", source=source)
        if self.link.backoff_max_s < self.link.backoff_initial_s:
            raise ConfigError("must be >= link.backoff_initial_s", path="link.backoff_max_s", source=source)
        if len(set(self.gateway.party_ids)) != len(self.gateway.party_ids):
            raise ConfigError("party ids repeat", path="gateway.party_ids", source=source)

    @property
    def display_name(self) -> str:
        return self.gateway.name or f"fedgate-{self.gateway.party_ids[0]}"


def config_from_data(data: object, *, source: str = "") -> FedgateConfig:
    """Build and validate the tree from parsed TOML."""
    config = build(FedgateConfig, data, source=source)
    config.validate(source=source)
    return config


def load_config(path: pathlib.Path | str) -> FedgateConfig:
    """Load ``fedgate.toml``; every problem is a ConfigError naming the file and dotted path."""
    return config_from_data(load_toml(path), source=str(path))
