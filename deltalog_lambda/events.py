"""The events Lambda hands the handlers, as AWS sends them.

- **SQS batch** (ingest, and the compactor's notification queue):
  ``{"Records": [{"messageId", "body", "messageAttributes", "eventSource":
  "aws:sqs", ...}]}``, read through Powertools' ``SQSEvent``. An ingest
  message's body is one receipt (a line of ``deltalog generate``'s JSONL);
  its optional ``log`` string attribute names the log (else the default),
  its optional ``version`` number attribute orders the versions of one
  receipt (``deltalog_lambda.ingest``), and a FIFO queue adds the message's
  group (``attributes.MessageGroupId``). Each message's attributes are read
  on their own: a malformed one (a ``log`` of type Binary, an empty name, a
  ``version`` that is not a whole number) fails that message only.
- **S3 notification** (the body of a notification-queue message):
  ``{"Records": [{"eventSource": "aws:s3", "eventName":
  "ObjectCreated:Put", "s3": {"bucket": {"name"}, "object": {"key"}}}]}``
  with URL-encoded keys; S3 also sends one ``s3:TestEvent`` when the
  notification is configured.
- **Scheduled event**: the rule's constant input, ``{"log": "receipts"}``
  (or ``{"logs": [...]}``); an EventBridge "Scheduled Event" without input,
  or ``{}``, means every log served.
- **Function URL request** (query): payload format 2.0, ``{"version":
  "2.0", "requestContext": {"http": {"method"}}, "body",
  "isBase64Encoded"}``.

Pure: no I/O.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from aws_lambda_powertools.utilities.data_classes import SQSEvent
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from deltalog.errors import InvalidInput
from deltalog.keys import entry_log, valid_log_name

__all__ = [
    "Message",
    "compaction_logs",
    "entry_logs",
    "is_sqs_batch",
    "messages",
    "request_body",
]

log = logging.getLogger("deltalog_lambda")


@dataclass(frozen=True, slots=True)
class Message:
    """One SQS message: its id (what a partial batch response names), body and attributes."""

    message_id: str
    body: str
    log: str | None
    """The ``log`` message attribute, if the sender set one."""
    version: int | None = None
    """The ``version`` message attribute, if the sender set one."""
    group: str | None = None
    """The FIFO queue's ``MessageGroupId`` (None on a standard queue)."""
    problem: InvalidInput | None = None
    """Why the message's attributes cannot be used (it fails alone)."""
    attributes: Mapping[str, Any] = field(default_factory=dict)
    """Its message attributes as the event holds them (forwarded with it to a dead-letter queue)."""


def is_sqs_batch(event: Mapping[str, Any]) -> bool:
    records = event.get("Records")
    return isinstance(records, list) and all(
        isinstance(r, dict) and r.get("eventSource") == "aws:sqs" for r in records
    )


def messages(event: Mapping[str, Any]) -> list[Message]:
    """The messages of an SQS batch event."""
    if not is_sqs_batch(event):
        raise InvalidInput("not an SQS batch event: expected Records from aws:sqs")
    return [_message(record) for record in SQSEvent(dict(event)).records]


def _message(record: SQSRecord) -> Message:
    group = (record.raw_event.get("attributes") or {}).get("MessageGroupId")
    attributes = record.raw_event.get("messageAttributes") or {}
    try:
        name = _attribute(attributes, "log", "String")
        version = _attribute(attributes, "version", "Number")
        return Message(
            record.message_id,
            record.body,
            _name(name) if name is not None else None,
            _version(version) if version is not None else None,
            group,
            attributes=attributes,
        )
    except InvalidInput as exc:
        return Message(
            record.message_id, record.body, None, group=group, problem=exc, attributes=attributes
        )


def _attribute(attributes: Mapping[str, Any], name: str, kind: str) -> str | None:
    """A message attribute's string value, of ``kind`` (custom suffixes allowed)."""
    attribute = attributes.get(name)
    if attribute is None:
        return None
    data_type = attribute.get("dataType", "") if isinstance(attribute, dict) else ""
    value = attribute.get("stringValue") if isinstance(attribute, dict) else None
    if data_type.split(".", 1)[0] != kind or not isinstance(value, str):
        raise InvalidInput(
            f"the message attribute {name!r} must be of type {kind}, not {data_type or '?'}"
        )
    return value


def _version(text: str) -> int:
    if not text.strip().isdigit():
        raise InvalidInput(f"the version attribute must be a whole number >= 0, not {text!r}")
    return int(text)


def compaction_logs(event: Mapping[str, Any], served: tuple[str, ...], root: str) -> list[str]:
    """The logs a compactor event asks for, in the order first named.

    An SQS batch of S3 notifications names the logs of the entries created
    (snapshots and other keys wake nothing); a scheduled event names one
    log, several, or (without a name) every log served.
    """
    if is_sqs_batch(event):
        return list(dict.fromkeys(entry_logs((m.body for m in messages(event)), root)))
    if "log" in event:
        return [_name(event["log"])]
    if "logs" in event:
        names = event["logs"]
        if not isinstance(names, list) or not names:
            raise InvalidInput('"logs" must be a non-empty list of log names')
        return list(dict.fromkeys(_name(n) for n in names))
    return list(served)


def entry_logs(bodies: Iterable[str], root: str = "") -> Iterator[str]:
    """The log of each entry key in S3 notification bodies (others are skipped)."""
    for body in bodies:
        for key in _created_keys(body):
            name = entry_log(root, key)
            if name is not None:
                yield name


def _created_keys(body: str) -> list[str]:
    try:
        notification = json.loads(body)
    except json.JSONDecodeError:
        log.warning("skipped a notification that is not JSON")
        return []
    if not isinstance(notification, dict) or notification.get("Event") == "s3:TestEvent":
        return []
    keys = []
    for record in notification.get("Records") or []:
        if (
            isinstance(record, dict)
            and record.get("eventSource") == "aws:s3"
            and str(record.get("eventName", "")).startswith("ObjectCreated:")
        ):
            key = record.get("s3", {}).get("object", {}).get("key")
            if isinstance(key, str):
                keys.append(unquote_plus(key))
    return keys


def _name(value: object) -> str:
    if not isinstance(value, str) or not valid_log_name(value):
        raise InvalidInput(
            f"a log name must be 1-128 letters, digits, '.', '_' or '-', not {value!r}"
        )
    return value


def request_body(event: Mapping[str, Any]) -> Any:
    """The JSON body of a function URL request (payload format 2.0)."""
    body = event.get("body") or ""
    if event.get("isBase64Encoded"):
        try:
            body = base64.b64decode(body).decode("utf-8")
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"the request body is not base64 UTF-8: {exc}") from exc
    if not body:
        raise InvalidInput("the request has no body: POST a JSON query")
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not JSON: {exc}") from exc
