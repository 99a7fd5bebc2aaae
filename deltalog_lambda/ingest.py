"""The ingest handler: an SQS batch of receipts in, one delta per receipt.

``handler(event, context)`` (the template's ``IngestFunction``, fed by a
FIFO queue):

1. Each message's body is one receipt, a line of the JSONL ``deltalog
   generate`` writes; its ``log`` attribute (optional) names the log, else
   ``DELTALOG_LOG``. Each message's attributes are read on their own: a
   malformed one fails that message only.
2. **Order**: the messages of one FIFO message group (one receipt, or
   anything coarser) are handled one after the other in the order SQS gave
   them; groups run concurrently. When one fails, the later messages of its
   group fail with it without being tried, so SQS delivers them again in
   order after it: a version never lands after the one sent after it.
3. **Versions**: a message may carry a ``version`` number attribute (the
   receipt's version, e.g. its update time in ms). Before its append, the
   handler records it for the receipt (``Table.advance_version``, a
   conditional write); when a higher version is recorded already (an old
   message redriven from the dead-letter queue, or sent again late) it is
   **stale**: acknowledged, counted, not written.
4. The receipts are embedded and appended through one group-commit
   ``ReceiptProducer`` per log, each delta carrying the receipt's
   idempotency key (its ids and a hash of its content and embedder). A
   redelivered message (the whole batch again, after a timeout or a crash)
   finds its key's entry and writes nothing twice, and is not embedded
   again.
5. The answer is SQS's partial batch response, ``{"batchItemFailures":
   [{"itemIdentifier": messageId}, ...]}``: a receipt that fails (refused
   by the log, an outage, not written before the time ran out) fails only
   its own message (and the later ones of its group), which SQS delivers
   again. A message whose input can never be used (undecodable, invalid,
   a log not served) is forwarded to the dead-letter queue with the error
   as an attribute and acknowledged (``deltalog_lambda.dead_letters``);
   without ``DELTALOG_DEAD_LETTER_QUEUE_URL`` it is reported failed. When
   every message failed for a reason other than its input (an outage, a
   missing table), the handler raises instead, so the function's error
   metric and alarm see it.

Metrics (EMF, per log): ``DeltasIngested``, ``IngestFailures``,
``StaleReceipts``.
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
from deltalog.receipts.ingest import ReceiptProducer, receipt_subject
from deltalog.receipts.model import Receipt, decode_receipt
from deltalog_lambda.dead_letters import DeadLetters, open_dead_letters
from deltalog_lambda.events import Message, messages
from deltalog_lambda.handler import Context, Handler
from deltalog_lambda.metrics import DELTAS_INGESTED, INGEST_FAILURES, STALE_RECEIPTS, emit

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
    stale: set[str] = field(default_factory=set)
    failures: dict[str, DeltalogError] = field(default_factory=dict)
    invalid: dict[str, InvalidInput] = field(default_factory=dict)
    """Messages whose input can never be used (forwarded or reported failed)."""
    forwarded: set[str] = field(default_factory=set)
    logs: dict[str, str] = field(default_factory=dict)
    """The log each message was for."""

    def finished(self, message: Message) -> bool:
        return message.message_id in self.done or message.message_id in self.failures

    def fail(self, message: Message, error: DeltalogError) -> None:
        self.failures[message.message_id] = error
        log.warning("message %s failed: %s", message.message_id, error)

    def refuse(self, message: Message, error: InvalidInput) -> None:
        self.invalid[message.message_id] = error
        self.fail(message, error)

    def reported(self, message: Message) -> bool:
        """Whether the answer names ``message`` as failed (SQS delivers it again)."""
        return message.message_id in self.failures and message.message_id not in self.forwarded


@dataclass(frozen=True, slots=True)
class _Item:
    message: Message
    receipt: Receipt
    log: str


class IngestHandler(Handler):
    """Lambda's entry point for receipts from SQS; see the module docstring."""

    def __call__(self, event: dict[str, Any], context: Context | None) -> dict[str, Any]:
        batch = messages(event)
        outcome = _Outcome()
        items = self._decode(batch, outcome)
        try:
            if items:
                logs = {item.log: self.log(item.log) for item in items}
                embedder = self.embedder()
                budget = self._budget(context)
                self.runtime.call(self._ingest, logs, items, embedder, outcome, budget)
            if outcome.invalid and self.settings.dead_letter_queue:
                self.runtime.call(self._forward, self._dead_letters(), batch, outcome)
        except BaseException:
            self.runtime.reset()
            raise
        finally:
            self._emit(batch, outcome)
        return self._answer(batch, outcome)

    def _decode(self, batch: list[Message], outcome: _Outcome) -> list[_Item]:
        items = []
        for message in batch:
            name = message.log or self.settings.default_log
            outcome.logs[message.message_id] = name
            try:
                if message.problem is not None:
                    raise message.problem
                self.settings.check_log(name)
                items.append(_Item(message, decode_receipt(message.body), name))
            except InvalidInput as exc:
                if name not in self.settings.logs:  # its metrics go to the default log's
                    outcome.logs[message.message_id] = self.settings.default_log
                outcome.refuse(message, exc)
        return items

    def _budget(self, context: Context | None) -> float | None:
        remaining = self.remaining(context)
        if remaining is None:
            return None
        return max(0.0, remaining - max(5.0, _TIME_MARGIN * remaining))

    def _dead_letters(self) -> DeadLetters:
        url = self.settings.dead_letter_queue
        assert url is not None
        config = self.settings.config(self.settings.default_log)
        return self.runtime.resource(
            ("dead-letters", url), lambda: open_dead_letters(url, config), version=config
        )

    async def _ingest(
        self,
        logs: dict[str, DeltaLog],
        items: list[_Item],
        embedder: Embedder,
        outcome: _Outcome,
        budget: float | None,
    ) -> None:
        """Add every receipt, each group in order; leaving the producers flushes them."""
        async with AsyncExitStack() as stack:
            producers = {
                name: await stack.enter_async_context(
                    ReceiptProducer(deltalog, embedder, max_pending=max(8, len(items)))
                )
                for name, deltalog in logs.items()
            }
            with anyio.move_on_after(budget if budget is not None else math.inf):
                async with anyio.create_task_group() as tg:
                    for group in _groups(items):
                        tg.start_soon(self._add_group, producers, group, outcome)
        late = Unavailable("not written before the invocation's deadline: delivered again")
        for item in items:
            if not outcome.finished(item.message):
                outcome.fail(item.message, late)

    async def _add_group(
        self, producers: dict[str, ReceiptProducer], group: list[_Item], outcome: _Outcome
    ) -> None:
        """One group's receipts in order; after a failure the rest fail untried."""
        for i, item in enumerate(group):
            if not await self._add(producers[item.log], item, outcome):
                held = Unavailable(
                    f"an earlier message of its group ({item.message.message_id}) failed: "
                    "delivered again after it, in order"
                )
                for later in group[i + 1 :]:
                    outcome.fail(later.message, held)
                return

    async def _add(self, producer: ReceiptProducer, item: _Item, outcome: _Outcome) -> bool:
        message = item.message
        try:
            if message.version is not None and await self._stale(producer.log, item):
                outcome.stale.add(message.message_id)
                outcome.done.add(message.message_id)
                return True
            added = await producer.add(item.receipt)
        except InvalidInput as exc:
            outcome.refuse(message, exc)
            return True  # nothing of it was written: the rest of its group may go on
        except DeltalogError as exc:
            outcome.fail(message, exc)
            return False
        outcome.done.add(message.message_id)
        if not added.duplicate:
            outcome.written[item.log] += 1
        return True

    @staticmethod
    async def _stale(deltalog: DeltaLog, item: _Item) -> bool:
        """Record the message's version of its receipt; True when a higher one is recorded."""
        assert item.message.version is not None
        subject = receipt_subject(item.receipt)
        recorded = await deltalog.table.advance_version(
            deltalog.keys.log_id, subject, item.message.version
        )
        if recorded > item.message.version:
            log.info(
                "message %s holds version %d of %s; version %d is in the log: not written",
                item.message.message_id,
                item.message.version,
                subject,
                recorded,
            )
            return True
        return False

    @staticmethod
    async def _forward(dead_letters: DeadLetters, batch: list[Message], outcome: _Outcome) -> None:
        for message in batch:
            error = outcome.invalid.get(message.message_id)
            if error is not None and await dead_letters.forward(message, error):
                outcome.forwarded.add(message.message_id)

    def _emit(self, batch: list[Message], outcome: _Outcome) -> None:
        failed: dict[str, int] = defaultdict(int)
        stale: dict[str, int] = defaultdict(int)
        for message_id in outcome.failures:
            failed[outcome.logs[message_id]] += 1
        for message_id in outcome.stale:
            stale[outcome.logs[message_id]] += 1
        for name in dict.fromkeys(outcome.logs[m.message_id] for m in batch):
            figures = {
                DELTAS_INGESTED: outcome.written[name],
                INGEST_FAILURES: failed[name],
                STALE_RECEIPTS: stale[name],
            }
            emit(self.settings.namespace, name, figures)

    def _answer(self, batch: list[Message], outcome: _Outcome) -> dict[str, Any]:
        failures = [m.message_id for m in batch if outcome.reported(m)]
        errors = [outcome.failures[i] for i in failures]
        if batch and len(failures) == len(batch):
            systemic = [e for e in errors if not isinstance(e, InvalidInput)]
            if systemic:
                self.runtime.reset()
                raise systemic[0]
        log.info(
            "ingested a batch",
            extra={
                "messages": len(batch),
                "written": sum(outcome.written.values()),
                "stale": len(outcome.stale),
                "failed": len(failures),
                "forwarded": len(outcome.forwarded),
            },
        )
        return {"batchItemFailures": [{"itemIdentifier": i} for i in failures]}


def _groups(items: list[_Item]) -> list[list[_Item]]:
    """The items in their message groups, each in batch order (no group: alone)."""
    groups: dict[str, list[_Item]] = {}
    for item in items:
        key = f"group:{item.message.group}" if item.message.group else item.message.message_id
        groups.setdefault(key, []).append(item)
    return list(groups.values())


_handler: IngestHandler | None = None


def handler(event: dict[str, Any], context: Context | None) -> dict[str, Any]:
    """The function Lambda calls (``deltalog_lambda.ingest.handler``)."""
    global _handler
    if _handler is None:
        _handler = IngestHandler()
    return _handler(event, context)
