"""The handlers' metrics, as CloudWatch Embedded Metric Format.

Each handler prints one EMF line per log it worked on (dimension ``log``,
namespace ``POWERTOOLS_METRICS_NAMESPACE``), written by Powertools' EMF
provider: CloudWatch turns the lines into metrics, no API call needed. The
dimensions are pinned to ``log`` alone: Powertools would add a ``service``
dimension when ``POWERTOOLS_SERVICE_NAME`` is set, which would move every
metric away from the alarms that watch ``log`` (a metric's identity is its
namespace, name and whole dimension set).

- the compactor: the figures of ``compactor.metrics`` (``Lag``,
  ``EntriesApplied``, ``VectorsApplied``, ``RunSeconds``,
  ``BytesPublished``, ``BusyRuns``, ``LostLeases``, ``PoisonEntries``), the
  same figures ``compact --follow --metrics-port`` serves to Prometheus;
- ingest: ``DeltasIngested`` (receipts appended, one delta each; a
  redelivered receipt found in the log is not counted again),
  ``IngestFailures`` (messages that failed: reported back to SQS, or
  forwarded to the dead-letter queue as invalid) and ``StaleReceipts``
  (messages carrying an older version of a receipt than one already
  appended: acknowledged, not written).
"""

from __future__ import annotations

from aws_lambda_powertools.metrics import EphemeralMetrics

from compactor.metrics import Figure, Figures

__all__ = ["DELTAS_INGESTED", "INGEST_FAILURES", "INGEST_FIGURES", "STALE_RECEIPTS", "emit"]

DELTAS_INGESTED = Figure(
    "DeltasIngested", "Count", "counter", "deltalog_deltas_ingested", "Receipts appended"
)
INGEST_FAILURES = Figure(
    "IngestFailures", "Count", "counter", "deltalog_ingest_failures", "Messages that failed"
)
STALE_RECEIPTS = Figure(
    "StaleReceipts",
    "Count",
    "counter",
    "deltalog_stale_receipts",
    "Older versions of receipts acknowledged without writing",
)
INGEST_FIGURES = (DELTAS_INGESTED, INGEST_FAILURES, STALE_RECEIPTS)


def emit(namespace: str, log: str, figures: Figures) -> None:
    """Print one EMF line holding ``figures`` for ``log``."""
    metrics = EphemeralMetrics(namespace=namespace, service="")  # "": no service dimension
    metrics.add_dimension("log", log)
    for figure, value in figures.items():
        metrics.add_metric(figure.name, figure.unit, value)
    metrics.flush_metrics()
