"""The ingest handler: an SQS batch of receipts in, one delta per receipt.

``handler(event, context)`` (the template's ``IngestFunction``):

1. Each message's body is one receipt, a line of the JSONL ``deltalog
   generate`` writes; its ``log`` attribute (optional) names the log, else
   ``DELTALOG_LOG``.
2. The receipts are embedded and appended through one group-commit
   ``ReceiptProducer`` per log, each delta carrying the receipt's
   idempotency key (its ids and a hash of its content and embedder). A
   redelivered message (the whole batch again, after a timeout or a crash)
   finds its key's entry and writes nothing twice, and is not embedded
   again.
3. The answer is SQS's partial batch response, ``{"batchItemFailures":
   [{"itemIdentifier": messageId}, ...]}``: a receipt that fails
   (undecodable, invalid, refused by the log, or not written before the
   time ran out) fails only its own message, which SQS delivers again and,
   after ``maxReceiveCount`` deliveries, moves to the dead-letter queue.
   When every message failed for a reason other than its input (an outage,
   a missing table), the handler raises instead, so the function's error
   metric and alarm see it.

Metrics (EMF, per log): ``DeltasIngested``, ``IngestFailures``.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import anyio

from deltalog.errors import DeltalogError, InvalidInput, Unavailable
from deltalog.log import DeltaLog
from deltalog.receipts.embed import Embedder
from deltalog.receipts.ingest import ReceiptProducer
from deltalog.receipts.model import Receipt, decode_receipt
from deltalog_lambda.events import Message, messages
from deltalog_lambda.handler import Context, Handler
from deltalog_lambda.metrics import DELTAS_INGESTED, INGEST_FAILURES, emit

__all__ = ["IngestHandler", "handler"]

log = logging.getLogger("deltalog_lambda.ingest")

_TIME_MARGIN = 0.1
"""The share of the remaining time kept to flush and answer (at least 5 s)."""


@dataclass(slots=True)
class _Outcome:
    """What became of each message of a batch."""

    written: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Receipts appended (not duplicates), per log."""
    done: set[str] = field(default_factory=set)
    failures: dict[str, DeltalogError] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    """The log each message was for."""

    def finished(self, message: Message) -> bool:
        return message.message_id in self.done or message.message_id in self.failures

    def fail(self, message: Message, error: DeltalogError) -> None:
        self.failures[message.message_id] = error
        log.warning("message %s failed: %s", message.message_id, error)


class IngestHandler(Handler):
    """Lambda's entry point for receipts from SQS; see the module docstring."""

    def __call__(self, event: dict[str, Any], context: Context | None) -> dict[str, Any]:
        batch = messages(event)
        outcome = _Outcome()
        by_log = self._decode(batch, outcome)
        try:
            if by_log:
                work = [(self.log(name), items) for name, items in by_log.items()]
                embedder = self.embedder()
                budget = self._budget(context)
                self.runtime.call(self._ingest, work, embedder, outcome, budget)
        except BaseException:
            self.runtime.reset()
            raise
        finally:
            self._emit(batch, outcome)
        return self._answer(batch, outcome)

    def _decode(
        self, batch: list[Message], outcome: _Outcome
    ) -> dict[str, list[tuple[Message, Receipt]]]:
        by_log: dict[str, list[tuple[Message, Receipt]]] = defaultdict(list)
        for message in batch:
            name = message.log or self.settings.default_log
            outcome.logs[message.message_id] = name
            try:
                self.settings.check_log(name)
                by_log[name].append((message, decode_receipt(message.body)))
            except InvalidInput as exc:
                outcome.fail(message, exc)
        return by_log

    def _budget(self, context: Context | None) -> float | None:
        remaining = self.remaining(context)
        if remaining is None:
            return None
        return max(0.0, remaining - max(5.0, _TIME_MARGIN * remaining))

    async def _ingest(
        self,
        work: list[tuple[DeltaLog, list[tuple[Message, Receipt]]]],
        embedder: Embedder,
        outcome: _Outcome,
        budget: float | None,
    ) -> None:
        """Add every receipt; leaving the producers flushes what was submitted."""
        async with AsyncExitStack() as stack:
            producers = [
                (await stack.enter_async_context(self._producer(deltalog, embedder, items)), items)
                for deltalog, items in work
            ]
            with anyio.move_on_after(budget if budget is not None else math.inf):
                async with anyio.create_task_group() as tg:
                    for producer, items in producers:
                        for message, receipt in items:
                            tg.start_soon(self._add, producer, message, receipt, outcome)
        late = Unavailable("not written before the invocation's deadline: delivered again")
        for _, items in work:
            for message, _ in items:
                if not outcome.finished(message):
                    outcome.fail(message, late)

    @staticmethod
    def _producer(
        deltalog: DeltaLog, embedder: Embedder, items: list[tuple[Message, Receipt]]
    ) -> ReceiptProducer:
        return ReceiptProducer(deltalog, embedder, max_pending=max(8, len(items)))

    async def _add(
        self, producer: ReceiptProducer, message: Message, receipt: Receipt, outcome: _Outcome
    ) -> None:
        try:
            added = await producer.add(receipt)
        except DeltalogError as exc:
            outcome.fail(message, exc)
            return
        outcome.done.add(message.message_id)
        if not added.duplicate:
            outcome.written[producer.log.config.log] += 1

    def _emit(self, batch: list[Message], outcome: _Outcome) -> None:
        failed: dict[str, int] = defaultdict(int)
        for message_id in outcome.failures:
            failed[outcome.logs[message_id]] += 1
        for name in dict.fromkeys(outcome.logs[m.message_id] for m in batch):
            figures = {DELTAS_INGESTED: outcome.written[name], INGEST_FAILURES: failed[name]}
            emit(self.settings.namespace, name, figures)

    def _answer(self, batch: list[Message], outcome: _Outcome) -> dict[str, Any]:
        failures = [m.message_id for m in batch if m.message_id in outcome.failures]
        errors = [outcome.failures[i] for i in failures]
        if batch and len(failures) == len(batch):
            systemic = [e for e in errors if not isinstance(e, InvalidInput)]
            if systemic:
                self.runtime.reset()
                raise systemic[0]
        return {"batchItemFailures": [{"itemIdentifier": i} for i in failures]}


_handler: IngestHandler | None = None


def handler(event: dict[str, Any], context: Context | None) -> dict[str, Any]:
    """The function Lambda calls (``deltalog_lambda.ingest.handler``)."""
    global _handler
    if _handler is None:
        _handler = IngestHandler()
    return _handler(event, context)
