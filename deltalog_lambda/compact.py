"""The compactor handler: one ``run_once`` per log an event names.

``handler(event, context)`` (the template's ``CompactorFunction``):

- **Which logs**: a scheduled event's input names one (``{"log":
  "receipts"}``, one rule per log) or several; an event without a name
  means every log served (``DELTALOG_LOGS``); an SQS batch of S3
  notifications names the logs whose entries were created (other keys,
  such as the compactor's own snapshots, wake nothing). Logs the
  deployment does not serve are refused (scheduled) or skipped
  (notifications).
- **How long**: each log's run gets ``Limits(max_seconds)`` = the
  invocation's remaining time minus a margin (``DELTALOG_TIME_MARGIN``,
  default 20 % and at least 30 s) kept for publishing and committing;
  the run stops reading when it is spent and commits what it applied, and
  the next invocation continues. Logs run in parallel, each under its own
  lease, whose heartbeat renews it during the call.
- **Outcome**: ``busy`` (another compactor holds the lease) is a success.
  A lost lease, a poison entry or any other failure raises once every log
  has finished, so Lambda's retries, the destination queue and the error
  alarm see it. The answer is the ``CompactionResult`` as JSON, or
  ``{"results": [...]}`` when the event named several logs.
- **Cache**: snapshots and working copies live under ``DELTALOG_CACHE_DIR``
  (``/tmp``), and the compactors stay open across warm invocations, so a
  warm run downloads nothing it already has.

Metrics (EMF, per log): the figures of ``compactor.metrics``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import anyio

from compactor.metrics import Figure, failure_figures, lag_figures, run_figures
from compactor.replay import Limits
from compactor.runner import CompactionResult, Compactor
from deltalog.errors import ConfigurationError, DeltalogError
from deltalog_lambda.events import compaction_logs, is_sqs_batch
from deltalog_lambda.handler import Context, Handler
from deltalog_lambda.metrics import emit

__all__ = ["CompactHandler", "handler"]

log = logging.getLogger("deltalog_lambda.compact")

_NO_DEADLINE = 900.0
"""The budget of a call without a Lambda context (Lambda's longest timeout)."""


@dataclass(slots=True)
class _Run:
    """One log's run in this invocation."""

    log: str
    result: CompactionResult | None = None
    error: Exception | None = None
    head: int | None = None
    hwm: int | None = None

    def figures(self) -> dict[Figure, float]:
        figures: dict[Figure, float] = {}
        if self.result is not None:
            figures = run_figures(self.result)
        elif self.error is not None:
            figures = failure_figures(self.error)
        if self.head is not None and self.hwm is not None:
            figures.update(lag_figures(self.head, self.hwm))
        return figures


class CompactHandler(Handler):
    """Lambda's entry point for compaction; see the module docstring.

    ``compactor_options`` are passed to every ``Compactor`` (tests use them
    to slow a run down).
    """

    def __init__(self, *args: Any, compactor_options: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.compactor_options = compactor_options or {}

    def __call__(self, event: dict[str, Any], context: Context | None) -> dict[str, Any]:
        started = time.monotonic()
        names = self._logs(event)
        if not names:
            return {"results": []}
        budget = self._budget(context)
        try:
            compactors = [self.compactor(name, **self.compactor_options) for name in names]
            budget -= time.monotonic() - started  # opening them took some of it
            runs = self.runtime.call(self._run_all, compactors, budget)
        except BaseException:
            self.runtime.reset()
            raise
        for run in runs:
            emit(self.settings.namespace, run.log, run.figures())
        self._raise_failures(runs)
        results = [asdict(run.result) for run in runs if run.result is not None]
        return results[0] if len(names) == 1 else {"results": results}

    def _logs(self, event: dict[str, Any]) -> list[str]:
        root = self.settings.config(self.settings.default_log).root
        names = compaction_logs(event, self.settings.logs, root)
        if not is_sqs_batch(event):
            for name in names:
                self.settings.check_log(name)
            return names
        skipped = [n for n in names if n not in self.settings.logs]
        if skipped:
            log.warning("skipped notifications of logs not served here: %s", ", ".join(skipped))
        return [n for n in names if n in self.settings.logs]

    def _budget(self, context: Context | None) -> float:
        remaining = self.remaining(context)
        if remaining is None:
            return _NO_DEADLINE
        margin = self.settings.margin(remaining)
        if remaining <= margin:
            raise ConfigurationError(
                f"{remaining:.0f}s left is within the {margin:.0f}s kept to publish and commit: "
                "raise the function's timeout or lower DELTALOG_TIME_MARGIN"
            )
        return remaining - margin

    async def _run_all(self, compactors: list[Compactor], budget: float) -> list[_Run]:
        runs = [_Run(c.config.log) for c in compactors]
        async with anyio.create_task_group() as tg:
            for compactor, run in zip(compactors, runs, strict=True):
                tg.start_soon(self._run_one, compactor, run, max(0.0, budget))
        return runs

    async def _run_one(self, compactor: Compactor, run: _Run, budget: float) -> None:
        compactor.limits = Limits(max_seconds=budget)
        try:
            run.result = await compactor.run_once()
        except Exception as exc:  # raised by the handler once every log has finished
            run.error = exc
        try:
            run.head = await compactor.log.head()
            run.hwm = (
                run.result.hwm_after
                if run.result is not None
                else (await compactor.table.read_state(compactor.keys.log_id)).hwm
            )
        except DeltalogError as exc:
            log.warning("%s: could not read the lag: %s", run.log, exc)

    def _raise_failures(self, runs: list[_Run]) -> None:
        failed = [run for run in runs if run.error is not None]
        for run in failed:
            log.error("%s: %s: %s", run.log, type(run.error).__name__, run.error)
        if failed:
            self.runtime.reset()
            error = failed[0].error
            assert error is not None
            raise error


_handler: CompactHandler | None = None


def handler(event: dict[str, Any], context: Context | None) -> dict[str, Any]:
    """The function Lambda calls (``deltalog_lambda.compact.handler``)."""
    global _handler
    if _handler is None:
        _handler = CompactHandler()
    return _handler(event, context)
