"""The query handler behind a function URL: Chroma-shaped answers, 400 for a bad request."""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from compactor import Compactor
from deltalog import DeltaLog, LogConfig
from deltalog.errors import ConfigurationError
from deltalog.receipts.embed import HashingEmbedder
from deltalog.receipts.generate import generate_receipts
from deltalog.receipts.ingest import ReceiptProducer
from deltalog.receipts.model import Receipt, Records, line_records, word_records
from deltalog_lambda.query import QueryHandler
from tests.deltalog_lambda.conftest import DIM
from tests.deltalog_lambda.lambda_aws import Context, invoke


def url_request(body: Any, *, base64_encoded: bool = False) -> dict[str, Any]:
    """A function URL invocation (payload format 2.0), as Lambda sends it."""
    text = json.dumps(body)
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": "/",
        "rawQueryString": "",
        "headers": {"content-type": "application/json", "host": "abc.lambda-url.us-east-1.on.aws"},
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "abc",
            "domainName": "abc.lambda-url.us-east-1.on.aws",
            "http": {
                "method": "POST",
                "path": "/",
                "protocol": "HTTP/1.1",
                "sourceIp": "127.0.0.1",
            },
            "requestId": "id",
            "routeKey": "$default",
            "stage": "$default",
            "time": "30/Nov/2026:12:00:00 +0000",
            "timeEpoch": 1796040000000,
        },
        "body": base64.b64encode(text.encode()).decode() if base64_encoded else text,
        "isBase64Encoded": base64_encoded,
    }


@pytest.fixture
def query(lambda_env: LogConfig) -> Iterator[QueryHandler]:
    handler = QueryHandler()
    yield handler
    handler.close()


async def test_a_query_gets_a_chroma_shaped_answer(
    query: QueryHandler, lambda_env: LogConfig, tmp_path: object
) -> None:
    """A query by text ranks the word whose embedding input it is first (at distance 0:
    the deployment's embedder, the right collection) and answers that word's document and
    metadata; a get by ``where`` answers one receipt's lines."""
    receipts = list(generate_receipts(3, seed=4))
    async with DeltaLog.open(lambda_env) as log:
        async with ReceiptProducer(log, HashingEmbedder(DIM)) as producer:
            await producer.add_many(receipts)
        async with Compactor(lambda_env, cache_dir=f"{tmp_path}/c") as compactor:
            await compactor.run_once()
    words = word_records(receipts[0])
    k = unique_input(words, receipts)
    answer = await invoke(
        query,
        url_request({"collection": "words", "query_texts": [words.inputs[k]], "n_results": 3}),
        Context(),
    )
    assert answer["statusCode"] == 200
    assert answer["headers"]["content-type"] == "application/json"
    found = json.loads(answer["body"])
    assert set(found) == {"ids", "distances", "documents", "metadatas"}
    assert len(found["ids"]) == 1 and len(found["ids"][0]) == 3
    assert found["ids"][0][0] == words.ids[k], "the queried word ranks first"
    distances = found["distances"][0]
    assert distances[0] < 1e-5 and distances == sorted(distances)
    assert found["documents"][0][0] == words.documents[k]
    assert found["metadatas"][0][0] == words.metadatas[k]
    image = str(receipts[1].image_id)
    got = await invoke(
        query,
        url_request({"collection": "lines", "where": {"image_id": image}}, base64_encoded=True),
        Context(),
    )
    lines = json.loads(got["body"])
    assert set(lines) == {"ids", "documents", "metadatas"}
    assert sorted(lines["ids"]) == sorted(line_records(receipts[1]).ids)
    assert {m["image_id"] for m in lines["metadatas"]} == {image}


async def test_a_fresh_query_by_vector_sees_the_tail(
    query: QueryHandler, lambda_env: LogConfig, tmp_path: object
) -> None:
    """A receipt appended after the compaction: a fresh query by its word's vector ranks
    that word first; a snapshot query, which stops at hwm, does not see it."""
    first, late = generate_receipts(2, seed=7)
    embedder = HashingEmbedder(DIM)
    async with DeltaLog.open(lambda_env) as log:
        async with ReceiptProducer(log, embedder) as producer:
            await producer.add_many([first])
        async with Compactor(lambda_env, cache_dir=f"{tmp_path}/c") as compactor:
            await compactor.run_once()
        async with ReceiptProducer(log, embedder) as producer:
            await producer.add_many([late])
    words = word_records(late)
    k = unique_input(words, [first, late])
    vector = embedder.embed_sync([words.inputs[k]])[0].tolist()
    answers = {}
    for consistency in ("fresh", "snapshot"):
        request = {"collection": "words", "query_embeddings": [vector], "n_results": 2}
        answer = await invoke(
            query, url_request({**request, "consistency": consistency}), Context()
        )
        assert answer["statusCode"] == 200
        answers[consistency] = json.loads(answer["body"])
    fresh = answers["fresh"]
    assert fresh["ids"][0][0] == words.ids[k] and fresh["distances"][0][0] < 1e-5
    assert fresh["metadatas"][0][0] == words.metadatas[k]
    assert not set(answers["snapshot"]["ids"][0]) & set(words.ids), "not compacted yet"


def unique_input(words: Records, receipts: list[Receipt]) -> int:
    """The index of a word whose embedding input no other word of ``receipts`` has."""
    inputs = Counter(text for r in receipts for text in word_records(r).inputs)
    return next(i for i, text in enumerate(words.inputs) if inputs[text] == 1)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"collection": "words", "query_textz": ["x"]}, "bad query request"),
        ({"collection": "words", "query_texts": ["x"], "log": "elsewhere"}, "not one this"),
        ({"query_texts": ["x"]}, "collection"),
        ("not json at all", "not json"),
    ],
)
async def test_a_bad_request_is_a_400_that_says_what_to_fix(
    query: QueryHandler, lambda_env: LogConfig, body: Any, says: str
) -> None:
    event = url_request(body)
    if body == "not json at all":
        event["body"] = body
    answer = await invoke(query, event, Context())
    assert answer["statusCode"] == 400
    assert says in json.loads(answer["body"])["error"].lower()


@pytest.fixture
async def small_log(lambda_env: LogConfig, tmp_path: object) -> list[Any]:
    """Three receipts, compacted."""
    receipts = list(generate_receipts(3, seed=5))
    async with DeltaLog.open(lambda_env) as log:
        async with ReceiptProducer(log, HashingEmbedder(DIM)) as producer:
            await producer.add_many(receipts)
        async with Compactor(lambda_env, cache_dir=f"{tmp_path}/c") as compactor:
            await compactor.run_once()
    return receipts


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"collection": "words", "limit": -1}, "limit must be 1 to 50"),
        ({"collection": "words", "limit": 0}, "limit must be 1 to 50"),
        ({"collection": "words", "limit": 51}, "limit must be 1 to 50"),
        ({"collection": "words", "query_texts": ["a"], "n_results": 51}, "1 to 50"),
        ({"collection": "words", "query_texts": ["a", "b"], "n_results": 26}, "1 to 50"),
        ({"collection": "words", "query_texts": ["a"], "n_results": 0}, "1 to 50"),
        ({"collection": "words", "ids": [f"x{i}" for i in range(51)]}, "at most 50"),
        ({"collection": "words"}, "more than 50 records match"),
    ],
)
async def test_the_answer_is_bounded_and_a_request_past_a_bound_is_a_400_naming_it(
    lambda_env: LogConfig,
    small_log: list[Any],
    monkeypatch: pytest.MonkeyPatch,
    body: dict[str, Any],
    says: str,
) -> None:
    monkeypatch.setenv("DELTALOG_QUERY_MAX_RESULTS", "50")
    handler = QueryHandler()
    try:
        answer = await invoke(handler, url_request(body), Context())
        within = await invoke(handler, url_request({"collection": "lines", "limit": 50}), Context())
    finally:
        handler.close()
    assert answer["statusCode"] == 400
    error = json.loads(answer["body"])["error"]
    assert says in error and "DELTALOG_QUERY_MAX_RESULTS" in error
    assert within["statusCode"] == 200
    assert 0 < len(json.loads(within["body"])["ids"]) <= 50


async def test_an_answer_too_large_for_lambda_is_a_400_not_a_broken_response(
    lambda_env: LogConfig, small_log: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DELTALOG_QUERY_MAX_ANSWER_BYTES", "2KiB")
    handler = QueryHandler()
    try:
        big = await invoke(handler, url_request({"collection": "words", "limit": 200}), Context())
        small = await invoke(handler, url_request({"collection": "words", "limit": 1}), Context())
    finally:
        handler.close()
    assert big["statusCode"] == 400
    assert "over 2048 (DELTALOG_QUERY_MAX_ANSWER_BYTES" in json.loads(big["body"])["error"]
    assert small["statusCode"] == 200 and len(small["body"]) <= 2048
    monkeypatch.setenv("DELTALOG_QUERY_MAX_ANSWER_BYTES", "7MiB")
    with pytest.raises(ConfigurationError, match="Lambda's limit"):
        QueryHandler()
