"""The ingest handler, called as Lambda calls it, on batches from a real SQS queue (moto).

Each message is one receipt in ``deltalog generate``'s JSONL form. The
handler answers with SQS's partial batch response; ``Queue.settle`` does
with it what Lambda does (delete the successes, let the failures come
back), so redeliveries and the dead-letter queue are SQS's own.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any, cast

import msgspec
import numpy as np
import pytest

from deltalog import DeltaLog, LogConfig
from deltalog.entry import Upsert
from deltalog.errors import ConfigurationError, Unavailable
from deltalog.receipts.embed import Embedder
from deltalog.receipts.generate import generate_receipts
from deltalog.receipts.model import Receipt, encode_receipt, word_records
from deltalog.storage.aws import client
from deltalog_lambda.ingest import IngestHandler
from deltalog_lambda.metrics import INGEST_FIGURES
from tests.deltalog_lambda.conftest import DIM, NAMESPACE
from tests.deltalog_lambda.lambda_aws import Context, Queue, emf_lines, invoke
from tests.openai_server import API_KEY, OpenAIServer, vector_for


@pytest.fixture(scope="module")
def receipts() -> list[Receipt]:
    return list(generate_receipts(8, seed=12))


@pytest.fixture
def ingest(lambda_env: LogConfig) -> Iterator[IngestHandler]:
    handler = IngestHandler()  # reads the environment, as in Lambda
    yield handler
    handler.close()


def body(receipt: Receipt) -> str:
    return encode_receipt(receipt).decode()


async def receipts_in_log(config: LogConfig) -> Counter[str]:
    """How many times each receipt (image/receipt) was upserted, over every delta."""
    found: Counter[str] = Counter()
    async with DeltaLog.open(config) as log:
        async for _, entry in log.read():
            for delta in entry.deltas:
                for op in delta.ops:
                    if isinstance(op, Upsert) and op.collection == "lines" and op.metadatas:
                        meta = op.metadatas[0]
                        found[f"{meta['image_id']}/{meta['receipt_id']}"] += 1
    return found


def _word_inputs(receipt: Receipt) -> tuple[list[str], list[str]]:
    records = word_records(receipt)
    return records.ids, records.inputs


def key_of(receipt: Receipt) -> str:
    return f"{receipt.image_id}/{receipt.receipt_id}"


async def test_a_batch_appends_one_delta_per_receipt(
    ingest: IngestHandler, lambda_env: LogConfig, receipts: list[Receipt]
) -> None:
    async with AsyncExitStack() as stack:
        queue = await Queue.create(stack, lambda_env, f"ingest-{lambda_env.log}")
        await queue.send([body(r) for r in receipts])
        messages = await queue.receive_all()
        response = await invoke(ingest, queue.event(messages), Context())
    assert response == {"batchItemFailures": []}
    assert await receipts_in_log(lambda_env) == Counter({key_of(r): 1 for r in receipts})
    async with DeltaLog.open(lambda_env) as log:
        entries = [entry async for _, entry in log.read()]
    deltas = [d for e in entries for d in e.deltas]
    assert len(deltas) == len(receipts), "one delta per receipt"
    assert all(d.idempotency_key and d.idempotency_key.startswith("receipt:") for d in deltas)
    assert len(entries) < len(receipts), "group commit: receipts share entries"


async def test_redelivering_a_whole_batch_leaves_every_receipt_once(
    ingest: IngestHandler, lambda_env: LogConfig, receipts: list[Receipt]
) -> None:
    async with AsyncExitStack() as stack:
        queue = await Queue.create(stack, lambda_env, f"redeliver-{lambda_env.log}")
        await queue.send([body(r) for r in receipts])
        messages = await queue.receive_all()
        event = queue.event(messages)
        # A crash after some receipts were written: SQS delivers the batch again.
        await invoke(ingest, queue.event(messages[:3]), Context())
        first = await invoke(ingest, event, Context())
        again = await invoke(ingest, event, Context())  # and once more, whole
    assert first == again == {"batchItemFailures": []}
    assert await receipts_in_log(lambda_env) == Counter({key_of(r): 1 for r in receipts})


async def test_two_bad_receipts_fail_exactly_their_own_messages(
    ingest: IngestHandler,
    lambda_env: LogConfig,
    receipts: list[Receipt],
    capsys: pytest.CaptureFixture[str],
) -> None:
    not_json = "{this is not a receipt"
    no_words = json.dumps({**json.loads(body(receipts[0])), "words": [], "receipt_id": 99})
    bodies = [body(r) for r in receipts[:3]] + [not_json] + [body(r) for r in receipts[3:6]]
    bodies += [no_words]
    async with AsyncExitStack() as stack:
        queue = await Queue.create(stack, lambda_env, f"bad-{lambda_env.log}")
        ids = await queue.send(bodies)
        messages = await queue.receive_all()
        response = await invoke(ingest, queue.event(messages), Context())
    failed = [f["itemIdentifier"] for f in response["batchItemFailures"]]
    assert sorted(failed) == sorted([ids[3], ids[7]])
    assert await receipts_in_log(lambda_env) == Counter({key_of(r): 1 for r in receipts[:6]})
    (emf,) = emf_lines(capsys.readouterr().out)
    assert (emf["DeltasIngested"], emf["IngestFailures"]) == ([6], [2])


async def test_bad_receipts_go_to_the_dead_letter_queue_and_never_block_the_rest(
    ingest: IngestHandler, lambda_env: LogConfig, receipts: list[Receipt]
) -> None:
    bad = ['{"image_id": "not a uuid"}', "[]"]
    async with AsyncExitStack() as stack:
        dlq = await Queue.create(stack, lambda_env, f"dlq-{lambda_env.log}")
        queue = await Queue.create(
            stack, lambda_env, f"q-{lambda_env.log}", dead_letter=dlq, max_receive_count=2
        )
        bad_ids = await queue.send(bad)
        await queue.send([body(r) for r in receipts])
        polls = 0
        while polls < 12:
            messages, _ = await queue.poll(ingest, Context())
            if not messages:
                break
            polls += 1
        dead = await dlq.receive_all()
        assert await queue.receive_all() == []
    assert sorted(m["MessageId"] for m in dead) == sorted(bad_ids)
    assert await receipts_in_log(lambda_env) == Counter({key_of(r): 1 for r in receipts})


async def test_a_message_names_its_log(
    lambda_env: LogConfig, receipts: list[Receipt], monkeypatch: pytest.MonkeyPatch
) -> None:
    other = f"{lambda_env.log}-b"
    monkeypatch.setenv("DELTALOG_LOGS", f"{lambda_env.log},{other}")
    handler = IngestHandler()
    try:
        async with AsyncExitStack() as stack:
            queue = await Queue.create(stack, lambda_env, f"logs-{lambda_env.log}")
            await queue.send([body(receipts[0])])
            await queue.send([body(receipts[1])], log=other)
            (unknown,) = await queue.send([body(receipts[2])], log="not-served")
            response = await invoke(handler, queue.event(await queue.receive_all()), Context())
    finally:
        handler.close()
    assert response == {"batchItemFailures": [{"itemIdentifier": unknown}]}
    assert await receipts_in_log(lambda_env) == Counter({key_of(receipts[0]): 1})
    other_log = lambda_env.with_log(other)
    assert await receipts_in_log(other_log) == Counter({key_of(receipts[1]): 1})


async def test_a_failure_that_is_not_the_input_fails_the_invocation(
    lambda_env: LogConfig, receipts: list[Receipt], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing table is not a receipt's fault: the invocation raises (alarm, retry)."""
    monkeypatch.setenv("DELTALOG_TABLE", "no-such-table")
    handler = IngestHandler()
    try:
        async with AsyncExitStack() as stack:
            queue = await Queue.create(stack, lambda_env, f"broken-{lambda_env.log}")
            await queue.send([body(r) for r in receipts[:2]])
            event = queue.event(await queue.receive_all())
            with pytest.raises(ConfigurationError, match="does not exist"):
                await invoke(handler, event, Context())
    finally:
        handler.close()


# -- the OpenAI key, read at run time ---------------------------------------------------


@pytest.fixture(scope="module")
def openai_server() -> Iterator[OpenAIServer]:
    with OpenAIServer(dim=DIM) as server:
        yield server


async def _store_key(config: LogConfig, where: str) -> tuple[str, str]:
    """Put the API key in Secrets Manager or SSM; (the variable, the name) to give it by."""
    async with AsyncExitStack() as stack:
        if where == "secret":
            secrets = await client(stack, config, "secretsmanager")
            made = await secrets.create_secret(Name=f"openai-{config.log}", SecretString=API_KEY)
            return "DELTALOG_OPENAI_KEY_SECRET", str(made["ARN"])
        ssm = await client(stack, config, "ssm")
        name = f"/deltalog/{config.log}/openai"
        await ssm.put_parameter(Name=name, Value=API_KEY, Type="SecureString")
        return "DELTALOG_OPENAI_KEY_PARAMETER", name


@pytest.mark.parametrize("where", ["secret", "parameter"])
async def test_the_openai_key_is_read_at_run_time_from_secrets_manager_or_ssm(
    where: str,
    lambda_env: LogConfig,
    receipts: list[Receipt],
    openai_server: OpenAIServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    variable, name = await _store_key(lambda_env, where)
    monkeypatch.setenv(variable, name)
    monkeypatch.setenv("DELTALOG_EMBEDDER", "openai")
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.url)
    handler = IngestHandler()
    seen = len(openai_server.requests)
    try:
        async with AsyncExitStack() as stack:
            queue = await Queue.create(stack, lambda_env, f"{where}-{lambda_env.log}")
            await queue.send([body(r) for r in receipts[:2]])
            event = queue.event(await queue.receive_all())
            response = await invoke(handler, event, Context())
    finally:
        handler.close()
    assert response == {"batchItemFailures": []}
    requests = openai_server.requests[seen:]
    assert requests, "embedded by the OpenAI-compatible server"
    assert {(r.authorization, r.status) for r in requests} == {(f"Bearer {API_KEY}", 200)}
    async with DeltaLog.open(lambda_env) as log:
        upserts = [op async for _, e in log.read() for d in e.deltas for op in d.ops]
    words = next(op for op in upserts if isinstance(op, Upsert) and op.collection == "words")
    inputs = {w: i for r in receipts[:2] for w, i in zip(*_word_inputs(r), strict=True)}
    assert np.array_equal(words.embeddings[0], vector_for(inputs[words.ids[0]], DIM))
    assert "OPENAI_API_KEY" not in handler.settings.env


async def test_a_missing_secret_is_a_configuration_error_naming_it(
    lambda_env: LogConfig, receipts: list[Receipt], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = f"arn:aws:secretsmanager:us-east-1:123456789012:secret:gone-{lambda_env.log}"
    monkeypatch.setenv("DELTALOG_OPENAI_KEY_SECRET", missing)
    monkeypatch.setenv("DELTALOG_EMBEDDER", "auto")
    handler = IngestHandler()
    try:
        async with AsyncExitStack() as stack:
            queue = await Queue.create(stack, lambda_env, f"nokey-{lambda_env.log}")
            await queue.send([body(receipts[0])])
            event: dict[str, Any] = queue.event(await queue.receive_all())
            with pytest.raises(ConfigurationError, match=f"cannot read the secret {missing}"):
                await invoke(handler, event, Context())
    finally:
        handler.close()


async def test_ingest_metrics_are_emf_lines_with_the_metric_names(
    lambda_env: LogConfig,
    receipts: list[Receipt],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The dimensions stay ``log`` alone even with ``POWERTOOLS_SERVICE_NAME`` set (Powertools
    would add ``service``, moving every metric away from the alarms)."""
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "somebody-set-this")
    ingest = IngestHandler()
    async with AsyncExitStack() as stack:
        stack.callback(ingest.close)
        queue = await Queue.create(stack, lambda_env, f"emf-{lambda_env.log}")
        await queue.send([body(r) for r in receipts[:4]])
        event = queue.event(await queue.receive_all())
        capsys.readouterr()
        await invoke(ingest, event, Context())
        await invoke(ingest, event, Context())  # a redelivery: nothing ingested twice
    first, second = emf_lines(capsys.readouterr().out)
    for emf in (first, second):
        (directive,) = emf["_aws"]["CloudWatchMetrics"]
        assert directive["Namespace"] == NAMESPACE
        assert directive["Dimensions"] == [["log"]]
        assert {m["Name"] for m in directive["Metrics"]} == {f.name for f in INGEST_FIGURES}
        assert isinstance(emf["_aws"]["Timestamp"], int)
        assert emf["log"] == lambda_env.log
        assert "service" not in emf
    assert (first["DeltasIngested"], second["DeltasIngested"]) == ([4], [0])


async def test_a_receipt_not_written_before_the_deadline_fails_only_its_message(
    lambda_env: LogConfig,
    receipts: list[Receipt],
    openai_server: OpenAIServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DELTALOG_EMBEDDER", "openai")
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.url)
    handler = IngestHandler()
    try:
        async with AsyncExitStack() as stack:
            queue = await Queue.create(stack, lambda_env, f"late-{lambda_env.log}")
            await queue.send([body(receipts[0])])
            first = queue.event(await queue.receive_all())
            assert await invoke(handler, first, Context()) == {"batchItemFailures": []}
            ids = await queue.send([body(r) for r in receipts[:3]])
            event = queue.event(await queue.receive_all())
            openai_server.delay = 10.0  # embedding now outlasts the invocation
            try:
                # 8 s left, 5 s kept to answer: 3 s to write. The receipt already in
                # the log needs no embedding; the two others miss the deadline.
                late = await invoke(handler, event, Context(remaining_ms=8_000))
            finally:
                openai_server.delay = 0.0
            again = await invoke(handler, event, Context())  # SQS delivers them again
    finally:
        handler.close()
    assert sorted(f["itemIdentifier"] for f in late["batchItemFailures"]) == sorted(ids[1:])
    assert again == {"batchItemFailures": []}
    assert await receipts_in_log(lambda_env) == Counter({key_of(r): 1 for r in receipts[:3]})


# -- one message's attributes, invalid input, versions and order ----------------------------


async def test_a_malformed_attribute_fails_only_its_own_message(
    ingest: IngestHandler, lambda_env: LogConfig, receipts: list[Receipt]
) -> None:
    """A ``log`` attribute of type Binary (no ``stringValue``), an empty one, a version that is
    not a number: each fails its own message; the rest of the batch is ingested."""
    bad_attributes: list[dict[str, Any]] = [
        {"log": {"DataType": "Binary", "BinaryValue": b"\x00receipts"}},
        {"log": {"DataType": "String", "StringValue": " "}},
        {"version": {"DataType": "String", "StringValue": "v2"}},
    ]
    async with AsyncExitStack() as stack:
        queue = await Queue.create(stack, lambda_env, f"attrs-{lambda_env.log}")
        good = await queue.send([body(r) for r in receipts[:2]])
        bad = [
            (await queue.send([body(r)], attributes=a))[0]
            for r, a in zip(receipts[2:5], bad_attributes, strict=True)
        ]
        messages = await queue.receive_all()
        response = await invoke(ingest, queue.event(messages), Context())
    assert sorted(f["itemIdentifier"] for f in response["batchItemFailures"]) == sorted(bad)
    assert await receipts_in_log(lambda_env) == Counter({key_of(r): 1 for r in receipts[:2]})
    assert len(good) == 2


async def test_invalid_input_goes_to_the_dead_letter_queue_at_once_with_its_reason(
    lambda_env: LogConfig, receipts: list[Receipt], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not retried ``maxReceiveCount`` times: forwarded with the error as an attribute, and
    acknowledged (not in the answer); the good receipts of the batch are ingested."""
    async with AsyncExitStack() as stack:
        dlq = await Queue.create(stack, lambda_env, f"dl-{lambda_env.log}", fifo=True)
        monkeypatch.setenv("DELTALOG_DEAD_LETTER_QUEUE_URL", dlq.url)
        handler = IngestHandler()
        stack.callback(handler.close)
        queue = await Queue.create(stack, lambda_env, f"in-{lambda_env.log}", fifo=True)
        await queue.send([body(receipts[0])], group="r0")
        (bad,) = await queue.send(["{not a receipt"], group="r1", log=lambda_env.log)
        response = await invoke(handler, queue.event(await queue.receive_all()), Context())
        (dead,) = await dlq.receive_all()
    assert response == {"batchItemFailures": []}
    assert dead["Body"] == "{not a receipt"
    attributes = dead["MessageAttributes"]
    assert attributes["error_type"]["StringValue"] == "InvalidReceipt"
    assert (
        "not valid JSON" in attributes["error"]["StringValue"] or attributes["error"]["StringValue"]
    )
    assert attributes["log"]["StringValue"] == lambda_env.log, "its own attributes go with it"
    assert dead["Attributes"]["MessageGroupId"] == "r1"
    assert await receipts_in_log(lambda_env) == Counter({key_of(receipts[0]): 1})
    assert bad


def _version(n: int) -> dict[str, Any]:
    return {"version": {"DataType": "Number", "StringValue": str(n)}}


async def merchants_in_order(config: LogConfig, receipt: Receipt) -> list[str]:
    """The merchant of each upsert of ``receipt``'s lines, in seq order: the last one wins."""
    found = []
    async with DeltaLog.open(config) as log:
        async for _, entry in log.read():
            for delta in entry.deltas:
                for op in delta.ops:
                    if isinstance(op, Upsert) and op.collection == "lines" and op.metadatas:
                        meta = op.metadatas[0]
                        if (meta["image_id"], meta["receipt_id"]) == (
                            str(receipt.image_id),
                            receipt.receipt_id,
                        ):
                            found.append(str(meta["merchant_name"]))
    return found


async def test_a_redelivered_older_version_never_replaces_a_newer_one(
    ingest: IngestHandler,
    lambda_env: LogConfig,
    receipts: list[Receipt],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Version 1 of a receipt comes back after version 2 was appended (redriven from the
    dead-letter queue, or sent again): acknowledged, counted, not written."""
    v1 = msgspec.structs.replace(receipts[0], merchant_name="Version One")
    v2 = msgspec.structs.replace(receipts[0], merchant_name="Version Two")
    async with AsyncExitStack() as stack:
        queue = await Queue.create(stack, lambda_env, f"ver-{lambda_env.log}", fifo=True)
        group = str(v1.image_id)
        await queue.send([body(v2)], attributes=_version(2), group=group)
        assert await queue.poll(ingest, Context()) != ([], None)
        capsys.readouterr()
        await queue.send([body(v1)], attributes=_version(1), group=group)
        messages, response = await queue.poll(ingest, Context())
        # The same version again is a redelivery: allowed, and a duplicate.
        await queue.send([body(v2) + " "], attributes=_version(2), group=group)
        again, _ = await queue.poll(ingest, Context())
    assert len(messages) == 1 and response == {"batchItemFailures": []}, "acknowledged"
    assert await merchants_in_order(lambda_env, receipts[0]) == ["Version Two"]
    (emf,) = emf_lines(capsys.readouterr().out)[:1]
    assert (emf["StaleReceipts"], emf["DeltasIngested"]) == ([1], [0])
    assert len(again) == 1


async def test_a_group_is_ingested_in_order_and_a_failure_holds_the_rest_of_it(
    lambda_env: LogConfig, receipts: list[Receipt]
) -> None:
    """Two versions of a receipt in one FIFO group, without version attributes: the first
    fails (its embedding, once), so the second fails untried and both come back in order:
    the log ends with the second."""
    words = receipts[1].words
    first_word = msgspec.structs.replace(words[0], text="FIRSTVERSION")
    v1 = msgspec.structs.replace(receipts[1], merchant_name="First", words=[first_word, *words[1:]])
    v2 = msgspec.structs.replace(receipts[1], merchant_name="Second")
    handler = _FailingOnce(marker="FIRSTVERSION")
    try:
        async with AsyncExitStack() as stack:
            queue = await Queue.create(stack, lambda_env, f"order-{lambda_env.log}", fifo=True)
            await queue.send([body(v1), body(v2)], group="receipt-1")
            await queue.send([body(receipts[2])], group="receipt-2")
            batch, first = await queue.poll(handler, Context())
            assert first is not None and len(batch) == 3
            failed = {f["itemIdentifier"] for f in first["batchItemFailures"]}
            assert failed == {batch[0]["MessageId"], batch[1]["MessageId"]}, (
                "the other group went on"
            )
            _, second = await queue.poll(handler, Context())
    finally:
        handler.close()
    assert second == {"batchItemFailures": []}
    assert await merchants_in_order(lambda_env, receipts[1]) == ["First", "Second"]
    assert handler.failed == 1


class _FailingOnce(IngestHandler):
    """The deployment's handler whose embedder fails once for a receipt naming ``marker``:
    a transient outage that hits one message of a batch."""

    def __init__(self, *, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.failed = 0

    def embedder(self) -> Embedder:
        real = super().embedder()
        handler = self

        class Flaky:
            name, dim = real.name, real.dim

            async def embed(self, texts: list[str]) -> Any:
                if handler.failed == 0 and any(handler.marker in t for t in texts):
                    handler.failed += 1
                    raise Unavailable("the embedder is down (injected once)")
                return await real.embed(texts)

            async def aclose(self) -> None:
                return None

        return cast(Embedder, Flaky())
