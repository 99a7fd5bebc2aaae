"""``PrometheusExporter``: the compactor's figures for Prometheus.

Outside Lambda, ``compact --follow --metrics-port N`` serves the figures of
``compactor.metrics`` at ``http://ADDR:N/metrics`` (prometheus-client's own
HTTP server, in a daemon thread), one series per log (label ``log``):
``deltalog_lag_entries`` (gauge), ``deltalog_entries_applied_total``,
``deltalog_vectors_applied_total``, ``deltalog_bytes_published_total``,
``deltalog_busy_runs_total``, ``deltalog_lost_leases_total``,
``deltalog_poison_entries_total`` (counters) and ``deltalog_run_seconds``
(a histogram). Every series has the labels ``log`` and ``shard`` (the
shard's index; empty for a log without shards, which Prometheus reads as no
label). The Lambda handlers emit the same figures as CloudWatch metrics.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from compactor.metrics import FIGURES, Figure, Figures

__all__ = ["PrometheusExporter"]

_RUN_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, float("inf"))


def _metric(figure: Figure, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
    labels = ("log", "shard")
    if figure.kind == "counter":
        return Counter(figure.prometheus, figure.help, labels, registry=registry)
    if figure.kind == "gauge":
        return Gauge(figure.prometheus, figure.help, labels, registry=registry)
    return Histogram(
        figure.prometheus, figure.help, labels, registry=registry, buckets=_RUN_BUCKETS
    )


def _shard(shard: int | None) -> str:
    return "" if shard is None else str(shard)


class PrometheusExporter:
    """Records figures per log and shard; ``serve`` exposes them over HTTP until ``close``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._metrics = {figure: _metric(figure, self.registry) for figure in FIGURES}
        self._server: Any = None
        self.port = 0

    def track(self, log: str, shard: int | None = None) -> None:
        """Make a log's (shard's) series exist from the start (at zero), before its first run."""
        for metric in self._metrics.values():
            metric.labels(log=log, shard=_shard(shard))

    def record(self, log: str, figures: Figures, shard: int | None = None) -> None:
        for figure, value in figures.items():
            metric = self._metrics[figure].labels(log=log, shard=_shard(shard))
            if isinstance(metric, Counter):
                metric.inc(value)
            elif isinstance(metric, Gauge):
                metric.set(value)
            else:
                metric.observe(value)

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Start serving ``/metrics``; the port bound (``port=0`` picks a free one)."""
        self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
        self.port = int(self._server.server_port)
        return self.port

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> PrometheusExporter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
