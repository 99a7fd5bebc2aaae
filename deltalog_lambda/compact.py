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

- **Shards**: a log of several shards (or a reshard in progress) is fanned
  out (``deltalog_lambda.fanout``): with ``DELTALOG_SHARD_QUEUE_URL`` the
  handler sends one task per shard to the shard queue and answers
  ``{"dispatched": [...]}``; each task comes back as an SQS batch of one,
  and that invocation compacts that shard alone. Without a queue it
  compacts every shard itself, in parallel. ``DELTALOG_SHARDS`` keeps the
  layout at the stack's shard count (a new log is created with it, another
  count is resharded).

Metrics (EMF, per log, and per log and shard for a shard): the figures of
``compactor.metrics``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import msgspec

from compactor.metrics import Figure, failure_figures, lag_figures, run_figures
from compactor.replay import Limits
from compactor.runner import CompactionResult, Compactor
from deltalog.errors import ConfigurationError, DeltalogError
from deltalog.keys import Shard
from deltalog.storage.table import LogState
from deltalog_lambda.budget import CacheBudget, Unit, need
from deltalog_lambda.events import ShardTask, compaction_logs, is_sqs_batch, shard_tasks
from deltalog_lambda.fanout import Plan, open_shard_queue, plan_shards, shard_of_task
from deltalog_lambda.handler import Context, Handler
from deltalog_lambda.metrics import emit

__all__ = ["CompactHandler", "handler"]

log = logging.getLogger("deltalog_lambda.compact")

_NO_DEADLINE = 900.0
"""The budget of a call without a Lambda context (Lambda's longest timeout)."""


@dataclass(slots=True)
class _Run:
    """One log's (or shard's) run in this invocation."""

    log: str
    shard: int | None = None
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
        tasks = shard_tasks(event)
        if tasks is not None:
            return self._tasks(tasks, deadline)
        names = self._logs(event)
        if not names:
            return {"results": []}
        dispatched: list[ShardTask] = []
        units: list[tuple[str, Shard | None]] = []
        known: dict[str, LogState] = {}
        try:
            for name in names:
                plan = self._plan(name)
                if plan.own is not None:
                    known[name] = plan.own
                if self.settings.shard_queue is not None and plan.shards != [None]:
                    chosen = [shard for shard in plan.shards if shard is not None]
                    dispatched += self.runtime.call(self._dispatch, name, chosen)
                else:
                    units += [(name, shard) for shard in plan.shards]
            runs = self._run_units(units, deadline, known)
        except BaseException:
            self.runtime.reset()
            raise
        results = [asdict(run.result) for run in runs if run.result is not None]
        if not dispatched and len(names) == 1 and len(results) == 1:
            return results[0]
        answer: dict[str, Any] = {"results": results}
        if dispatched:
            answer["dispatched"] = [msgspec.to_builtins(task) for task in dispatched]
        return answer

    def _run_units(
        self,
        units: list[tuple[str, Shard | None]],
        deadline: float,
        known: dict[str, LogState] | None = None,
    ) -> list[_Run]:
        """Run the compactors of ``units`` (log, shard) in parallel; report them; raise the
        first failure once all finished. ``known``: logs' own states already read."""
        compactors = [self.compactor(n, s, **self.compactor_options) for n, s in units]
        if not compactors:
            return []
        self._make_room(compactors, known or {})
        runs = self.runtime.call(self._run_all, compactors, deadline)
        for run in runs:
            emit(self.settings.namespace, run.log, run.figures(), shard=run.shard)
            run.report()
            if run.result is not None and run.result.status != "busy":
                self._sizes[_size_key(run)] = _size_of(run.result)
        self._raise_failures(runs)
        return runs

    def _plan(self, name: str) -> Plan:
        """The shards of log ``name`` to compact now (``deltalog_lambda.fanout``)."""
        s = self.settings
        return self.runtime.call(plan_shards, self.log(name), s.shards, s.reshard_lag)

    async def _dispatch(self, name: str, shards: list[Shard]) -> list[ShardTask]:
        assert self.settings.shard_queue is not None
        async with open_shard_queue(self.settings.shard_queue, self.config(name)) as queue:
            tasks = await queue.send(name, shards)
        log.info("%s: %d shard tasks sent", name, len(tasks))
        return tasks

    def _tasks(self, tasks: list[ShardTask], deadline: float) -> dict[str, Any]:
        """A batch from the shard queue: compact the shards it names (stale ones dropped)."""
        units: list[tuple[str, Shard | None]] = []
        try:
            for task in tasks:
                self.settings.check_log(task.log)
                shard = self.runtime.call(shard_of_task, self.log(task.log), task)
                if shard is None:
                    log.info("%s: dropped a task of generation %d", task.log, task.generation)
                    continue
                units.append((task.log, shard))
            runs = self._run_units(units, deadline)
        except BaseException:
            self.runtime.reset()
            raise
        return {"results": [asdict(run.result) for run in runs if run.result is not None]}

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

    def _make_room(self, compactors: list[Compactor], known: dict[str, LogState]) -> None:
        """Evict other logs' caches when ``/tmp`` cannot hold what these runs need."""
        states = self.runtime.call(_states, compactors, known)
        runs = [
            (Unit(c.cache.root), need(state)) for c, state in zip(compactors, states, strict=True)
        ]
        budget = CacheBudget(self.settings.cache_dir / "cache", capacity=self.settings.cache_bytes)
        budget.make_room(runs, self._units())

    def _units(self) -> dict[Path, Unit]:
        """Each served log's (and its shards') cache directory, and how to close its compactor."""
        units = {}
        for name in self.settings.logs:
            cache_name = self.settings.config(name).keys.cache_name
            path = self.cache_root / cache_name
            units[path] = Unit(path, partial(self.runtime.discard, ("compactor", name)))
            for shard_path in self.cache_root.glob(f"{cache_name}#*"):
                key = ("compactor", name, shard_path.name.rpartition("#")[2])
                units[shard_path] = Unit(shard_path, partial(self.runtime.discard, key))
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
        runs = [_Run(c.config.log, None if c.shard is None else c.shard.index) for c in compactors]
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
                else (await compactor.read_state()).hwm
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


async def _states(compactors: list[Compactor], known: dict[str, LogState]) -> list[LogState]:
    """Each compactor's committed state (a log's own one read already is not read again)."""
    out = []
    for c in compactors:
        state = known.get(c.config.log) if c.shard is None else None
        out.append(state if state is not None else await c.read_state())
    return out


def _size_key(run: _Run) -> str:
    return run.log if run.shard is None else f"{run.log}#{run.shard}"


_handler: CompactHandler | None = None


def handler(event: dict[str, Any], context: Context | None) -> dict[str, Any]:
    """The function Lambda calls (``deltalog_lambda.compact.handler``)."""
    global _handler
    if _handler is None:
        _handler = CompactHandler()
    return _handler(event, context)
