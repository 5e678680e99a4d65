"""Prometheus metrics of the link, per peer party, created against a registry passed in.

Rules of this module: no metric object lives at module level (tests and several gateways in one
process each pass their own ``CollectorRegistry``); every name starts with ``fedgate_link_``;
the label ``peer`` is the other party's id. ``fedgate_link_carrier_*`` are read at scrape time from
the congestion controller of each open outbound connection whose carrier has one (QUIC, in the
gateway or in a worker process), with a ``lane`` label; a lane without one has no samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fedgate.congestion import CongestionStatistics

__all__ = ["CarrierCollector", "LinkMetrics", "QuicWorkerCollector"]


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


class CarrierCollector(Collector):
    """``fedgate_link_carrier_*``: the congestion controllers of the open outbound connections.

    ``source`` maps a sender name (the peer's party id for lane 0, ``party#N`` for lane N) to its
    controller's snapshot. Counters count per connection: they restart at 0 when a lane reconnects.
    """

    def __init__(self, source: Callable[[], Mapping[str, CongestionStatistics]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        labels = ["peer", "lane"]

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"fedgate_link_carrier_{name}", doc, labels=labels)

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"fedgate_link_carrier_{name}", doc, labels=labels)

        info = GaugeMetricFamily("fedgate_link_carrier_controller", "1 per open connection, labelled with its "
                                 "congestion controller and that controller's state.",
                                 labels=[*labels, "controller", "state"])
        cwnd = gauge("congestion_window_bytes", "Congestion window of the connection, bytes.")
        in_flight = gauge("in_flight_bytes", "Bytes sent and not yet acknowledged or declared lost.")
        pacing = gauge("pacing_rate_bytes_per_second", "Rate the pacer releases packets at.")
        model = gauge("bandwidth_estimate_bytes_per_second", "The controller's model of the path's bandwidth.")
        min_rtt = gauge("min_rtt_seconds", "Smallest round trip the controller measured.")
        srtt = gauge("smoothed_rtt_seconds", "Smoothed round trip.")
        sent = counter("sent_packets", "Packets sent on the connection.")
        lost = counter("lost_packets", "Packets the connection declared lost.")
        events = counter("congestion_events", "Times the controller backed off on congestion.")
        for name, stats in sorted(self._source().items()):
            peer, _, lane = name.partition("#")
            values = [peer, lane or "0"]
            info.add_metric([*values, stats.name, stats.state], 1)
            cwnd.add_metric(values, stats.congestion_window)
            in_flight.add_metric(values, stats.bytes_in_flight)
            for family, value in ((pacing, stats.pacing_rate), (model, stats.bandwidth_estimate),
                                  (min_rtt, stats.min_rtt), (srtt, stats.smoothed_rtt)):
                if value is not None:
                    family.add_metric(values, value)
            sent.add_metric(values, stats.packets_sent)
            lost.add_metric(values, stats.packets_lost)
            events.add_metric(values, stats.congestion_events)
        yield from (info, cwnd, in_flight, pacing, model, min_rtt, srtt, sent, lost, events)


class QuicWorkerCollector(Collector):
    """``fedgate_link_quic_workers_running`` and ``..._worker_restarts``: the QUIC worker processes.

    ``source`` gives the gateway's QUIC carrier when it runs in worker processes (``[quic] workers``),
    else None; then there are no samples.
    """

    def __init__(self, source: Callable[[], object | None]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        carrier = self._source()
        pids = getattr(carrier, "worker_pids", None)
        restarts = getattr(carrier, "restarts", None)
        if not isinstance(pids, list) or not isinstance(restarts, int):
            return
        running = GaugeMetricFamily("fedgate_link_quic_workers_running",
                                    "QUIC worker processes running (of [quic] workers).")
        running.add_metric([], sum(1 for pid in pids if pid is not None))
        yield running
        exits = CounterMetricFamily("fedgate_link_quic_worker_restarts",
                                    "QUIC worker processes that exited and were restarted.")
        exits.add_metric([], restarts)
        yield exits
