"""Embedders: the offline hashing embedder, and the real OpenAI client against a local server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Iterator

import anyio
import numpy as np
import pytest

from deltalog.errors import Closed, ConfigurationError, InvalidInput, Unavailable
from deltalog.receipts.embed import (
    DEFAULT_HASH_DIM,
    HashingEmbedder,
    OpenAIEmbedder,
    WordLlamaEmbedder,
    default_embedder,
    make_embedder,
)
from tests.openai_server import API_KEY, Fault, OpenAIServer, vector_for

DIM = 8


@pytest.fixture(scope="module")
def running_server() -> Iterator[OpenAIServer]:
    with OpenAIServer(dim=DIM) as server:
        yield server


@pytest.fixture
def server(running_server: OpenAIServer) -> Iterator[OpenAIServer]:
    running_server.reset()
    yield running_server
    running_server.settle()


def openai_embedder(server: OpenAIServer, **options: object) -> OpenAIEmbedder:
    settings: dict[str, object] = {"api_key": API_KEY, "base_url": server.url, "dimensions": DIM}
    settings.update(options)
    return OpenAIEmbedder(**settings)  # type: ignore[arg-type]


@pytest.fixture
async def embedder(server: OpenAIServer) -> AsyncIterator[OpenAIEmbedder]:
    e = openai_embedder(server)
    yield e
    await e.aclose()


def expected(texts: list[str]) -> np.ndarray:
    return np.stack([vector_for(t, DIM) for t in texts])


# -- hashing -------------------------------------------------------------------


async def test_hashing_is_deterministic_normalised_float32() -> None:
    texts = ["TOTAL 45.67", "<EDGE> <EDGE> COSTCO WHOLESALE <EDGE>", "x"]
    a = await HashingEmbedder(64).embed(texts)
    b = await HashingEmbedder(64).embed(texts)
    assert a.dtype == np.float32 and a.shape == (3, 64)
    assert np.array_equal(a, b)
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-6)


async def test_hashing_similar_texts_are_closer() -> None:
    e = HashingEmbedder(256)
    total, total2, bananas = await e.embed(["TOTAL 45.67", "TOTAL 45.68", "ORGANIC BANANAS"])
    assert float(total @ total2) > 0.5
    assert float(total @ total2) > float(total @ bananas) + 0.3


async def test_hashing_edge_cases() -> None:
    e = HashingEmbedder(16)
    assert (await e.embed([])).shape == (0, 16)
    blank = await e.embed(["", "   "])
    assert not blank.any()  # nothing to hash: zero vectors, not NaN
    with pytest.raises(InvalidInput, match="not one string"):
        await e.embed("TOTAL")
    with pytest.raises(ConfigurationError):
        HashingEmbedder(1)
    await e.aclose()
    with pytest.raises(Closed):
        await e.embed(["TOTAL"])


async def test_choosing_an_embedder(monkeypatch: pytest.MonkeyPatch) -> None:
    offline = default_embedder(env={})
    assert isinstance(offline, WordLlamaEmbedder) and offline.dim == 256
    async with default_embedder(env={"OPENAI_API_KEY": "sk-x"}) as online:
        assert isinstance(online, OpenAIEmbedder)
        assert (online.name, online.dim) == ("openai:text-embedding-3-small", 1536)
    assert isinstance(make_embedder("hash", dim=32), HashingEmbedder)
    assert make_embedder("hash").dim == DEFAULT_HASH_DIM
    with pytest.raises(InvalidInput, match="unknown embedder"):
        make_embedder("minilm")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY"):
        OpenAIEmbedder()
    with pytest.raises(ConfigurationError, match="dimensions="):
        OpenAIEmbedder("some-new-model", api_key="sk-x")


# -- OpenAI: wire format and batching -----------------------------------------


async def test_base64_vectors_come_back_in_input_order(
    server: OpenAIServer, embedder: OpenAIEmbedder
) -> None:
    server.shuffle = True  # data arrives in reverse; ``index`` says where each belongs
    texts = [f"word {i}" for i in range(10)]
    vectors = await embedder.embed(texts)
    assert vectors.dtype == np.float32
    assert np.array_equal(vectors, expected(texts))
    (request,) = server.requests
    assert request.encoding_format == "base64"
    assert request.inputs == texts
    assert request.model == "text-embedding-3-small" and request.dimensions == DIM
    assert request.authorization == f"Bearer {API_KEY}"
    assert embedder.statistics().tokens == 20


async def test_float_lists_are_accepted(server: OpenAIServer, embedder: OpenAIEmbedder) -> None:
    server.floats_only = True
    texts = ["SUBTOTAL", "TAX"]
    assert np.array_equal(await embedder.embed(texts), expected(texts))


async def test_batches_respect_input_count(server: OpenAIServer) -> None:
    e = openai_embedder(server, batch_size=4)
    texts = [f"t{i}" for i in range(10)]
    try:
        vectors = await e.embed(texts)
    finally:
        await e.aclose()
    assert np.array_equal(vectors, expected(texts))
    sent = sorted((r.inputs for r in server.requests), key=lambda inputs: inputs[0])
    assert [len(inputs) for inputs in sent] == [4, 4, 2]
    assert [t for inputs in sent for t in inputs] == sorted(texts)  # each text once
    assert e.statistics().requests == 3


async def test_batches_respect_token_budget(server: OpenAIServer) -> None:
    e = openai_embedder(server, max_request_tokens=50, max_input_tokens=50)
    texts = [f"{i:02d}" + "x" * 18 for i in range(7)]  # 20 bytes each
    try:
        vectors = await e.embed(texts)
    finally:
        await e.aclose()
    assert np.array_equal(vectors, expected(texts))
    assert sorted(len(r.inputs) for r in server.requests) == [1, 2, 2, 2]
    assert all(sum(len(t.encode()) for t in r.inputs) <= 50 for r in server.requests)


async def test_long_inputs_are_truncated_at_a_character_boundary(server: OpenAIServer) -> None:
    e = openai_embedder(server, max_input_tokens=16)
    texts = ["a" * 40, "é" * 20, "short"]
    try:
        vectors = await e.embed(texts)
    finally:
        await e.aclose()
    (request,) = server.requests
    assert request.inputs == ["a" * 16, "é" * 8, "short"]
    assert np.array_equal(vectors, expected(request.inputs))
    assert e.statistics().truncated == 2


async def serve_held(server: OpenAIServer, total: int, limit: int) -> None:
    """Answer ``total`` held requests one at a time, each once ``limit`` are waiting.

    Before each release, as many requests as the limit allows have arrived
    (an event, not a delay), so the server holds exactly ``limit`` at once
    when the client keeps its limit, and more when it does not.
    """
    for released in range(total):
        await anyio.to_thread.run_sync(
            server.wait_for_requests, released + min(limit, total - released)
        )
        server.release()


async def test_concurrency_is_limited(server: OpenAIServer) -> None:
    server.hold()
    e = openai_embedder(server, batch_size=1, max_concurrency=2)
    texts = [f"t{i}" for i in range(6)]
    got: list[np.ndarray] = []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _append(got, e.embed(texts)))
            await serve_held(server, 6, 2)
    finally:
        await e.aclose()
    assert np.array_equal(got[0], expected(texts))
    assert len(server.requests) == 6
    assert server.max_in_flight == 2


async def test_concurrency_limit_is_shared_by_concurrent_calls(server: OpenAIServer) -> None:
    server.hold()
    e = openai_embedder(server, max_concurrency=3)
    try:
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(e.embed, [f"receipt {i}"])
            await serve_held(server, 8, 3)
    finally:
        await e.aclose()
    assert len(server.requests) == 8
    assert server.max_in_flight == 3


async def _append(into: list[np.ndarray], vectors: Awaitable[np.ndarray]) -> None:
    into.append(await vectors)


# -- OpenAI: retries and errors -------------------------------------------------


async def test_429_is_retried_after_retry_after(
    server: OpenAIServer, embedder: OpenAIEmbedder
) -> None:
    server.faults.append(
        Fault(429, "Rate limit reached", "rate_limit_exceeded", headers={"Retry-After": "1"})
    )
    vectors = await embedder.embed(["TOTAL"])
    assert np.array_equal(vectors, expected(["TOTAL"]))
    first, second = server.requests
    assert (first.status, second.status) == (429, 200)
    # The client's own backoff for a first retry is at most 0.5 s: waiting about
    # a second means the Retry-After header was honoured.
    assert second.received - first.responded >= 0.9


async def test_500_is_retried(server: OpenAIServer, embedder: OpenAIEmbedder) -> None:
    server.faults.append(
        Fault(500, "The server had an error", None, "server_error", {"Retry-After": "0.05"})
    )
    assert np.array_equal(await embedder.embed(["TAX"]), expected(["TAX"]))
    assert [r.status for r in server.requests] == [500, 200]


async def test_throttling_beyond_the_retries_is_unavailable(server: OpenAIServer) -> None:
    for _ in range(3):
        server.faults.append(Fault(429, "Rate limit reached", headers={"Retry-After": "0.05"}))
    e = openai_embedder(server, max_retries=1)
    try:
        with pytest.raises(Unavailable, match="429"):
            await e.embed(["TOTAL"])
    finally:
        await e.aclose()
    assert len(server.requests) == 2


async def test_invalid_key_is_one_clear_configuration_error(server: OpenAIServer) -> None:
    e = openai_embedder(server, api_key="sk-wrong", batch_size=1, max_concurrency=1)
    try:
        with pytest.raises(ConfigurationError) as caught:
            await e.embed([f"t{i}" for i in range(5)])
        assert str(caught.value).startswith("invalid OpenAI API key")
        assert "401" in str(caught.value)
        await anyio.to_thread.run_sync(server.settle)
        assert len(server.requests) == 1  # no retries of a 401; later batches never start
        with pytest.raises(ConfigurationError, match="invalid OpenAI API key"):
            await e.embed(["again"])
        assert len(server.requests) == 1  # a known-bad key is not tried again
    finally:
        await e.aclose()


async def test_bad_request_is_invalid_input(server: OpenAIServer, embedder: OpenAIEmbedder) -> None:
    server.faults.append(Fault(400, "'$.input' is invalid"))
    with pytest.raises(InvalidInput, match=r"HTTP 400.*input' is invalid"):
        await embedder.embed(["TOTAL"])
    assert len(server.requests) == 1


async def test_out_of_quota_is_a_configuration_error(server: OpenAIServer) -> None:
    server.faults.append(Fault(429, "You exceeded your current quota", "insufficient_quota"))
    e = openai_embedder(server, max_retries=0)
    try:
        with pytest.raises(ConfigurationError, match="out of quota"):
            await e.embed(["TOTAL"])
    finally:
        await e.aclose()


async def test_empty_text_is_refused_before_sending(
    server: OpenAIServer, embedder: OpenAIEmbedder
) -> None:
    with pytest.raises(InvalidInput, match=r"texts\[1\] is empty"):
        await embedder.embed(["TOTAL", ""])
    assert server.requests == []
    assert (await embedder.embed([])).shape == (0, DIM)


async def test_closed_embedder_refuses(server: OpenAIServer) -> None:
    async with openai_embedder(server) as e:
        assert (await e.embed(["TOTAL"])).shape == (1, DIM)
    with pytest.raises(Closed):
        await e.embed(["TOTAL"])
