"""Messages whose input can never be used go to the dead-letter queue at once, with the reason.

An invalid message (an undecodable or invalid receipt, a log the deployment
does not serve, a malformed attribute) fails the same way on every
delivery. Reported back as failed, SQS would deliver it ``maxReceiveCount``
times and then move it without saying why. Instead ingest **forwards** it:
``DeadLetters.forward`` sends its body and attributes to the dead-letter
queue (``DELTALOG_DEAD_LETTER_QUEUE_URL``) with two more attributes,
``error`` (what is wrong, as the error says it) and ``error_type`` (the
deltalog error class), and the handler acknowledges the original.

On a FIFO queue the copy keeps the message's group and is deduplicated by
the original message id, so a forward retried after a lost answer leaves
one copy. When the send fails, ``forward`` answers False and the handler
reports the message failed: SQS moves it after its tries, without a reason.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from deltalog.config import LogConfig
from deltalog.errors import DeltalogError
from deltalog.storage.aws import client
from deltalog_lambda.events import Message

__all__ = ["DeadLetters", "open_dead_letters"]

log = logging.getLogger("deltalog_lambda.ingest")

_MAX_ERROR = 1_000
"""Characters of the error kept in the ``error`` attribute."""


class DeadLetters:
    """Sends messages to one dead-letter queue through an SQS client."""

    def __init__(self, url: str, sqs: Any) -> None:
        self.url = url
        self.sqs = sqs

    async def forward(self, message: Message, error: DeltalogError) -> bool:
        """Send ``message`` with ``error`` to the queue; False when that failed."""
        attributes = _send_attributes(message.attributes)
        attributes["error"] = {"DataType": "String", "StringValue": str(error)[:_MAX_ERROR]}
        attributes["error_type"] = {"DataType": "String", "StringValue": type(error).__name__}
        fifo: dict[str, str] = {}
        if self.url.endswith(".fifo"):
            fifo = {
                "MessageGroupId": message.group or message.message_id,
                "MessageDeduplicationId": message.message_id,
            }
        try:
            await self.sqs.send_message(
                QueueUrl=self.url,
                MessageBody=message.body or " ",  # SQS refuses an empty body
                MessageAttributes=attributes,
                **fifo,
            )
        except Exception as exc:  # reported failed instead: SQS moves it, without the reason
            log.warning("could not forward message %s to %s: %s", message.message_id, self.url, exc)
            return False
        return True


def _send_attributes(attributes: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A Lambda event's message attributes in the form ``SendMessage`` takes."""
    out: dict[str, dict[str, Any]] = {}
    for name, attribute in attributes.items():
        if not isinstance(attribute, dict) or name in ("error", "error_type"):
            continue
        data_type = str(attribute.get("dataType", ""))
        if data_type.startswith("Binary"):
            try:
                value = base64.b64decode(str(attribute.get("binaryValue", "")), validate=True)
            except (binascii.Error, ValueError):
                continue
            out[name] = {"DataType": data_type, "BinaryValue": value}
        elif isinstance(attribute.get("stringValue"), str) and data_type:
            out[name] = {"DataType": data_type, "StringValue": attribute["stringValue"]}
    return out


@asynccontextmanager
async def open_dead_letters(url: str, config: LogConfig) -> AsyncIterator[DeadLetters]:
    """A ``DeadLetters`` with its own SQS client (region and endpoint from ``config``)."""
    async with AsyncExitStack() as stack:
        yield DeadLetters(url, await client(stack, config, "sqs"))
