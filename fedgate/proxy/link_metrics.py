"""Prometheus metrics of the link, per peer party, created against a registry passed in.

Rules of this module: no metric object lives at module level (tests and several gateways in one
process each pass their own ``CollectorRegistry``); every name starts with ``fedgate_link_``;
the label ``peer`` is the other party's id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["LinkMetrics"]


class LinkMetrics:
    """Counters and gauges for both link directions; one instance per gateway."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str) -> Counter:
            return Counter(f"fedgate_link_{name}", doc, ["peer"], registry=registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"fedgate_link_{name}", doc, ["peer"], registry=registry)

        self.bytes_sent = counter("sent_bytes", "Payload bytes sent to the peer (resends included).")
        self.bytes_acked = counter("acked_bytes", "Payload bytes of messages the peer acknowledged.")
        self.messages_sent = counter("sent_messages", "Messages whose last chunk was sent to the peer.")
        self.messages_acked = counter("acked_messages", "Messages the peer stored (or had) and acknowledged.")
        self.messages_rejected = counter("rejected_messages", "Messages the peer's inbound audit rejected.")
        self.reconnects = counter("reconnects", "Link connection attempts after the first one (failed or not).")
        self.connected = gauge("connected", "1 while a link to the peer is open, else 0.")
        self.rtt = gauge("rtt_seconds", "Last PING round-trip time to the peer, in seconds.")
        self.outbox_depth = gauge("outbox_messages", "Messages waiting in the outbox for the peer.")
        self.outbox_age = gauge("outbox_oldest_age_seconds", "Age of the oldest outbox message for the peer.")
        self.received_bytes = counter("received_bytes", "Payload bytes received from the peer.")
        self.received_messages = counter("received_messages", "Messages from the peer stored for the first time.")
        self.duplicates = counter("duplicate_messages", "Messages from the peer that were already stored.")
        self.inbound_rejected = counter("inbound_rejected_messages", "Messages from the peer the audit rejected.")
        self.store_full = counter("store_full_retries", "Store writes refused as full and retried (held back).")
        self.inbound_connections = gauge("inbound_connections", "Open link connections from the peer.")
