"""Reading the events AWS sends: which logs a compaction event names, and SQS messages."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deltalog.errors import InvalidInput
from deltalog_lambda.events import compaction_logs, messages


def sqs(*bodies: str) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": f"m{i}",
                "receiptHandle": "h",
                "body": b,
                "attributes": {},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q",
                "awsRegion": "us-east-1",
            }
            for i, b in enumerate(bodies)
        ]
    }


def created(*keys: str, event: str = "ObjectCreated:Put") -> str:
    return json.dumps(
        {
            "Records": [
                {"eventSource": "aws:s3", "eventName": event, "s3": {"object": {"key": k}}}
                for k in keys
            ]
        }
    )


SERVED = ("a", "b.v2")


def test_a_scheduled_event_names_its_logs_or_means_all() -> None:
    assert compaction_logs({"log": "b.v2"}, SERVED, "") == ["b.v2"]
    assert compaction_logs({"logs": ["b.v2", "a", "a"]}, SERVED, "") == ["b.v2", "a"]
    assert compaction_logs({}, SERVED, "") == ["a", "b.v2"]
    assert compaction_logs({"source": "aws.events", "detail": {}}, SERVED, "") == ["a", "b.v2"]
    bad_events: list[dict[str, Any]] = [{"log": ""}, {"log": 3}, {"logs": []}, {"logs": "a"}]
    for bad in bad_events:
        with pytest.raises(InvalidInput):
            compaction_logs(bad, SERVED, "")


def test_notifications_name_the_logs_of_created_entries_only() -> None:
    event = sqs(
        created("a%2Fentries%2F00000000000000000003", "b.v2/entries/00000000000000000001"),
        created("a/snapshots/00000000000000000003-000000000001-ab.tar"),
        json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "x"}),
        created("c/entries/00000000000000000009"),
        created("a/entries/00000000000000000004", event="ObjectRemoved:Delete"),
        "not json",
    )
    assert compaction_logs(event, SERVED, "") == ["a", "b.v2", "c"]
    rooted = sqs(
        created("prod%2Fa%2Fentries%2F00000000000000000001", "a/entries/00000000000000000001")
    )
    assert compaction_logs(rooted, SERVED, "prod") == ["a"]


def test_sqs_messages_carry_their_id_body_and_log_attribute() -> None:
    event = sqs("one", "two")
    event["Records"][1]["messageAttributes"] = {
        "log": {
            "stringValue": "b.v2",
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": "String",
        }
    }
    got = messages(event)
    assert [(m.message_id, m.body, m.log) for m in got] == [
        ("m0", "one", None),
        ("m1", "two", "b.v2"),
    ]
    with pytest.raises(InvalidInput, match="not an SQS batch"):
        messages({"log": "a"})


def test_each_message_reads_its_own_attributes_and_a_bad_one_fails_alone() -> None:
    """A Binary ``log`` (no ``stringValue``), an empty or invalid name, a version that is not
    a whole number: that message carries the problem; the others are read as sent."""
    event = sqs("a", "b", "c", "d", "e")
    records = event["Records"]
    records[0]["messageAttributes"] = {"log": {"binaryValue": "AAE=", "dataType": "Binary"}}
    records[1]["messageAttributes"] = {"log": {"stringValue": "", "dataType": "String"}}
    records[2]["messageAttributes"] = {"version": {"stringValue": "1.5", "dataType": "Number"}}
    records[3]["messageAttributes"] = {
        "log": {"stringValue": "b.v2", "dataType": "String"},
        "version": {"stringValue": "1700000000123", "dataType": "Number"},
    }
    records[4]["attributes"] = {"MessageGroupId": "receipt-7"}
    got = messages(event)
    assert [m.problem is not None for m in got] == [True, True, True, False, False]
    assert all(isinstance(m.problem, InvalidInput) for m in got[:3])
    assert (got[3].log, got[3].version, got[3].group) == ("b.v2", 1700000000123, None)
    assert (got[4].log, got[4].version, got[4].group) == (None, None, "receipt-7")
    assert "Binary" in str(got[0].problem)
