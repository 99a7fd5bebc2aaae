"""What Lambda does around a handler, for the handlers' tests.

- ``Context``: Lambda's context object as far as the handlers use it: a
  deadline (``get_remaining_time_in_millis``).
- ``Queue``: a real SQS queue on moto's server, and Lambda's SQS poller:
  ``receive`` a batch, turn it into the event Lambda hands a function
  (``event``), and ``settle`` it as Lambda does with a partial batch
  response: delete the messages that succeeded and let the failed ones
  come back (their visibility timeout cut to 0), so SQS counts their
  deliveries and, past ``maxReceiveCount``, moves them to the dead-letter
  queue.
- ``invoke``: call a handler as Lambda calls it: synchronously, from a
  thread without an event loop, with an event dict and a context.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any

import anyio

from deltalog.config import LogConfig
from deltalog.storage.aws import client

REGION = "us-east-1"


class Context:
    """Lambda's context: an invocation with ``remaining_ms`` left.

    The clock starts when the function first asks, so a test that gives it
    little time knows exactly how little the handler saw.
    """

    function_name = "deltalog-test"
    memory_limit_in_mb = 3008

    def __init__(self, remaining_ms: int = 900_000) -> None:
        self.aws_request_id = str(uuid.uuid4())
        self.remaining_ms = remaining_ms
        self._deadline: float | None = None

    def get_remaining_time_in_millis(self) -> int:
        if self._deadline is None:
            self._deadline = time.monotonic() + self.remaining_ms / 1000
        return max(0, int((self._deadline - time.monotonic()) * 1000))


async def invoke(
    handler: Callable[[dict[str, Any], Any], Any], event: dict[str, Any], context: Any
) -> Any:
    """Call ``handler(event, context)`` from a worker thread, as Lambda's runtime does."""
    return await anyio.to_thread.run_sync(handler, event, context)


class Queue:
    """An SQS queue on the test endpoint, read the way Lambda's poller reads it."""

    def __init__(self, sqs: Any, url: str, arn: str) -> None:
        self.sqs = sqs
        self.url = url
        self.arn = arn

    @classmethod
    async def create(
        cls,
        stack: AsyncExitStack,
        config: LogConfig,
        name: str,
        *,
        dead_letter: Queue | None = None,
        max_receive_count: int = 2,
        fifo: bool = False,
    ) -> Queue:
        """A queue named ``name`` (``.fifo`` added for a FIFO queue, content-deduplicated)."""
        sqs = await client(stack, config, "sqs")
        attributes = {}
        if fifo:
            name = f"{name}.fifo"
            attributes = {"FifoQueue": "true", "ContentBasedDeduplication": "true"}
        if dead_letter is not None:
            attributes["RedrivePolicy"] = json.dumps(
                {"deadLetterTargetArn": dead_letter.arn, "maxReceiveCount": max_receive_count}
            )
        url = (await sqs.create_queue(QueueName=name, Attributes=attributes))["QueueUrl"]
        arn = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"]))[
            "Attributes"
        ]["QueueArn"]
        return cls(sqs, url, arn)

    async def send(
        self,
        bodies: Sequence[str],
        *,
        log: str | None = None,
        attributes: dict[str, Any] | None = None,
        group: str | None = None,
    ) -> list[str]:
        """Send each body as a message (with a ``log`` attribute if given, and
        ``attributes`` in ``SendMessage``'s form; in ``group`` on a FIFO queue); their ids."""
        ids = []
        for body in bodies:
            extra = dict(attributes or {})
            if log:
                extra["log"] = {"DataType": "String", "StringValue": log}
            fifo = {"MessageGroupId": group} if group else {}
            sent = await self.sqs.send_message(
                QueueUrl=self.url, MessageBody=body, MessageAttributes=extra, **fifo
            )
            ids.append(sent["MessageId"])
        return ids

    async def receive(self, most: int = 10) -> list[dict[str, Any]]:
        answer = await self.sqs.receive_message(
            QueueUrl=self.url,
            MaxNumberOfMessages=most,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        messages: list[dict[str, Any]] = answer.get("Messages", [])
        return messages

    async def receive_all(self) -> list[dict[str, Any]]:
        """Every visible message, in batches of 10, until a receive finds none."""
        found: list[dict[str, Any]] = []
        while batch := await self.receive():
            found += batch
        return found

    def event(self, messages: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The event Lambda's SQS poller hands the function for ``messages``."""
        return {"Records": [self._record(m) for m in messages]}

    def _record(self, message: dict[str, Any]) -> dict[str, Any]:
        return {
            "messageId": message["MessageId"],
            "receiptHandle": message["ReceiptHandle"],
            "body": message["Body"],
            "attributes": message.get("Attributes", {}),
            "messageAttributes": {
                name: _attribute(value)
                for name, value in message.get("MessageAttributes", {}).items()
            },
            "md5OfBody": message["MD5OfBody"],
            "eventSource": "aws:sqs",
            "eventSourceARN": self.arn,
            "awsRegion": REGION,
        }

    async def settle(self, messages: Sequence[dict[str, Any]], response: dict[str, Any]) -> None:
        """What Lambda does with a partial batch response."""
        failed = {f["itemIdentifier"] for f in response["batchItemFailures"]}
        for message in messages:
            if message["MessageId"] in failed:  # back after its visibility timeout: now
                await self.sqs.change_message_visibility(
                    QueueUrl=self.url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
                )
            else:
                await self.sqs.delete_message(
                    QueueUrl=self.url, ReceiptHandle=message["ReceiptHandle"]
                )

    async def poll(
        self, handler: Callable[[dict[str, Any], Any], Any], context: Any
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """One poll: receive a batch, invoke, settle. ``(messages, response)``."""
        messages = await self.receive()
        if not messages:
            return [], None
        response = await invoke(handler, self.event(messages), context)
        await self.settle(messages, response)
        return messages, response


def _attribute(value: dict[str, Any]) -> dict[str, Any]:
    """A message attribute as Lambda's event holds it: ``stringValue`` or base64
    ``binaryValue``, whichever the attribute has, never both."""
    attribute: dict[str, Any] = {
        "stringListValues": [],
        "binaryListValues": [],
        "dataType": value["DataType"],
    }
    if "StringValue" in value:
        attribute["stringValue"] = value["StringValue"]
    if "BinaryValue" in value:
        attribute["binaryValue"] = base64.b64encode(value["BinaryValue"]).decode()
    return attribute


def emf_lines(out: str) -> list[dict[str, Any]]:
    """The EMF documents among printed lines: JSON objects holding ``_aws``."""
    documents = []
    for line in out.splitlines():
        if line.startswith("{") and '"_aws"' in line:
            documents.append(json.loads(line))
    return documents
