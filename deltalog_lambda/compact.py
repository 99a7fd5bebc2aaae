"""The compactor handler: one ``run_once`` per log an event names.

``handler(event, context)`` (the template's ``CompactorFunction``):

- **Which logs**: a scheduled event's input names one (``{"log":
  "receipts"}``, one rule per log) or several; an event without a name
  means every log served (``DELTALOG_LOGS``); an SQS batch of S3
  notifications names the logs whose entries were created (other keys,
  such as the compactor's own snapshots, wake nothing). Logs the
  deployment does not serve are refused (scheduled) or skipped
  (notifications).
- **How long**: one absolute deadline for the whole invocation, taken
  from Lambda's context on entry: its end less a margin
  (``DELTALOG_TIME_MARGIN``, default 20 % and at least 30 s) kept for the
  commit, the release and the metrics. Each log's run gets it as
  ``Limits(deadline)``: the checkpoint's download and the committed tail's
  catch-up count against it, the replay stops early enough to leave the
  publish its time (sized from the checkpoint), and the run commits what it
  applied; the next invocation continues. Logs run in parallel, each under
  its own lease, whose heartbeat renews it during the call.
- **Outcome**: ``busy`` (another compactor holds the lease) is a success.
  A lost lease, a poison entry or any other failure raises once every log
  has finished, so Lambda's retries, the destination queue and the error
  alarm see it. The answer is the ``CompactionResult`` as JSON, or
  ``{"results": [...]}`` when the event named several logs; each run's
  result (or error) is also logged at INFO (ERROR) with its fields as
  structured extras, since a scheduled invocation's answer goes nowhere.
- **Cache**: snapshots and working copies live under ``DELTALOG_CACHE_DIR``
  (``/tmp``), and the compactors stay open across warm invocations, so a
  warm run downloads nothing it already has and applies into the Chroma
  index its compactor held open since the invocation before (its warm sink,
  ``compactor.working``; a failed invocation resets the runtime, closing it).
  ``/tmp`` is shared by every log this environment compacts: before the runs, a budget
  (``deltalog_lambda.budget``) evicts the caches of other logs, least
  recently used first, when the disk cannot hold what these runs need.

Metrics (EMF, per log): the figures of ``compactor.metrics``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from compactor.metrics import Figure, failure_figures, lag_figures, run_figures
from compactor.replay import Limits
from compactor.runner import CompactionResult, Compactor
from deltalog.errors import ConfigurationError, DeltalogError
from deltalog.storage.table import LogState
from deltalog_lambda.budget import CacheBudget, Unit, need
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

    def report(self) -> None:
        """Log the run's result (INFO) or error (ERROR), its fields as structured extras."""
        known = self.head is not None and self.hwm is not None
        lag = {"lag": max(0, (self.head or 0) - (self.hwm or 0))} if known else {}
        if self.result is not None:
            log.info(self.result.summary(), extra={"run": asdict(self.result), **lag})
        elif self.error is not None:
            error = {"type": type(self.error).__name__, "message": str(self.error)}
            log.error("%s: %s: %s", self.log, error["type"], self.error, extra={"error": error})


class CompactHandler(Handler):
    """Lambda's entry point for compaction; see the module docstring.

    ``compactor_options`` are passed to every ``Compactor`` (tests use them
    to slow a run down).
    """

    def __init__(self, *args: Any, compactor_options: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.compactor_options = compactor_options or {}
        self._sizes: dict[str, LogState] = {}
        """Each log's committed size after its last run here (what ``/tmp``'s budget needs)."""

    def __call__(self, event: dict[str, Any], context: Context | None) -> dict[str, Any]:
        deadline = self._deadline(context)
        names = self._logs(event)
        if not names:
            return {"results": []}
        try:
            compactors = [self.compactor(name, **self.compactor_options) for name in names]
            self._make_room(compactors)
            runs = self.runtime.call(self._run_all, compactors, deadline)
        except BaseException:
            self.runtime.reset()
            raise
        for run in runs:
            emit(self.settings.namespace, run.log, run.figures())
            run.report()
            if run.result is not None and run.result.status != "busy":
                self._sizes[run.log] = _size_of(run.result)
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

    def _make_room(self, compactors: list[Compactor]) -> None:
        """Evict other logs' caches when ``/tmp`` cannot hold what these runs need."""
        states = self.runtime.call(_states, compactors)
        runs = [
            (Unit(c.cache.root), need(state)) for c, state in zip(compactors, states, strict=True)
        ]
        budget = CacheBudget(self.settings.cache_dir / "cache", capacity=self.settings.cache_bytes)
        budget.make_room(runs, self._units())

    def _units(self) -> dict[Path, Unit]:
        """Each served log's cache directory, and how to close its compactor."""
        units = {}
        for name in self.settings.logs:
            path = self.cache_root / self.settings.config(name).keys.cache_name
            units[path] = Unit(path, partial(self.runtime.discard, ("compactor", name)))
        return units

    def _deadline(self, context: Context | None) -> float:
        """When every run of this invocation must be done (``time.monotonic()``'s clock)."""
        now = time.monotonic()
        remaining = self.remaining(context)
        if remaining is None:
            return now + _NO_DEADLINE
        margin = self.settings.margin(remaining)
        if remaining <= margin:
            raise ConfigurationError(
                f"{remaining:.0f}s left is within the {margin:.0f}s kept to commit and answer: "
                "raise the function's timeout or lower DELTALOG_TIME_MARGIN"
            )
        return now + remaining - margin

    async def _run_all(self, compactors: list[Compactor], deadline: float) -> list[_Run]:
        runs = [_Run(c.config.log) for c in compactors]
        async with anyio.create_task_group() as tg:
            for compactor, run in zip(compactors, runs, strict=True):
                tg.start_soon(self._run_one, compactor, run, deadline)
        return runs

    async def _run_one(self, compactor: Compactor, run: _Run, deadline: float) -> None:
        compactor.limits = Limits(deadline=deadline)
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
        if failed:
            self.runtime.reset()
            error = failed[0].error
            assert error is not None
            raise error


def _size_of(result: CompactionResult) -> LogState:
    return LogState(
        snapshot_key=result.snapshot_key,
        snapshot_size=result.snapshot_size,
        tail_bytes=result.tail_bytes,
    )


async def _states(compactors: list[Compactor]) -> list[LogState]:
    return [await c.table.read_state(c.keys.log_id) for c in compactors]


_handler: CompactHandler | None = None


def handler(event: dict[str, Any], context: Context | None) -> dict[str, Any]:
    """The function Lambda calls (``deltalog_lambda.compact.handler``)."""
    global _handler
    if _handler is None:
        _handler = CompactHandler()
    return _handler(event, context)
