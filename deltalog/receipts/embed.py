"""The embedder seam: texts in, float32 vectors out.

An ``Embedder`` has a ``name`` (recorded in idempotency keys, so a change of
model is a change of content), a ``dim``, ``embed(texts)`` returning an
array of shape ``(len(texts), dim)`` in input order, and ``aclose()``.

Adapters:

- ``OpenAIEmbedder``: the OpenAI embeddings API through ``openai.AsyncOpenAI``
  (``text-embedding-3-small`` by default). Requests stay within the API's
  limits (2,048 inputs and 300,000 tokens per request, 8,191 tokens per
  input); at most ``max_concurrency`` requests are in flight; the client
  retries 429 and 5xx itself, honouring ``Retry-After``. Without a
  tokenizer, an input's UTF-8 length in bytes stands for its token count:
  a token covers at least one byte, so this never underestimates. Longer
  inputs are **truncated** to ``max_input_tokens`` bytes (at a character
  boundary) and counted in ``statistics().truncated``.
- ``WordLlamaEmbedder`` (``deltalog.receipts.wordllama``): a real static
  embedding model shipped inside the ``wordllama`` wheel; offline, 256 dims.
- ``HashingEmbedder``: offline and deterministic: word unigrams and
  character trigrams hashed into ``dim`` signed buckets, L2-normalised.
  Texts that share words or spellings get similar vectors, whatever they
  mean. For tests, and for machines where wordllama cannot install.

Choosing (``--embedder`` on the command line, ``make_embedder``): ``openai``,
``wordllama``, ``hash``, or ``auto``: OpenAI when ``OPENAI_API_KEY`` is set,
else WordLlama (``default_embedder``). Errors are translated here and
nowhere else: a bad key is a ``ConfigurationError``, a refused input
``InvalidInput``, throttling or outages that outlast the retries
``Unavailable``.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, cast

import anyio
import numpy as np
import numpy.typing as npt

from deltalog.errors import (
    Closed,
    ConfigurationError,
    DataError,
    DeltalogError,
    InvalidInput,
    Unavailable,
)
from deltalog.receipts.vectors import (
    EmbedderStatistics,
    Vectors,
    as_batch,
    as_texts,
    unit_rows,
    zeros,
)
from deltalog.receipts.wordllama import DEFAULT_WORDLLAMA_DIM, WordLlamaEmbedder

if TYPE_CHECKING:
    import openai
    from openai.types import CreateEmbeddingResponse

__all__ = [
    "DEFAULT_HASH_DIM",
    "Embedder",
    "EMBEDDER_KINDS",
    "EmbedderKind",
    "EmbedderStatistics",
    "HashingEmbedder",
    "OpenAIEmbedder",
    "WordLlamaEmbedder",
    "default_embedder",
    "make_embedder",
]

log = logging.getLogger(__name__)

EmbedderKind = Literal["auto", "openai", "wordllama", "hash"]
EMBEDDER_KINDS: tuple[EmbedderKind, ...] = ("auto", "openai", "wordllama", "hash")
DEFAULT_HASH_DIM = 384

MAX_INPUTS_PER_REQUEST = 2048
MAX_TOKENS_PER_REQUEST = 300_000
MAX_TOKENS_PER_INPUT = 8191
_MODEL_DIMS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}


class Embedder(Protocol):
    """Turns texts into vectors of one dimension."""

    name: str
    dim: int

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """Shape ``(len(texts), dim)``, float32, row ``i`` for ``texts[i]``."""
        ...

    async def aclose(self) -> None: ...


# -- offline -------------------------------------------------------------------

_TOKEN = re.compile(r"\w+|[^\w\s]+")
_CACHE_LIMIT = 200_000


class HashingEmbedder:
    """Feature hashing of words and character trigrams; deterministic, offline."""

    def __init__(self, dim: int = DEFAULT_HASH_DIM) -> None:
        if dim < 2:
            raise ConfigurationError(f"dim must be at least 2, got {dim}")
        self.dim = dim
        self.name = "hashing-v1"
        self._tokens: dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]] = {}
        self._texts = 0
        self._closed = False

    async def embed(self, texts: Sequence[str]) -> Vectors:
        batch = as_batch(texts, closed=self._closed)
        if not batch:
            return zeros(self.dim)
        self._texts += len(batch)
        return await anyio.to_thread.run_sync(self.embed_sync, batch)

    def embed_sync(self, texts: Sequence[str]) -> Vectors:
        """``embed`` without a worker thread."""
        rows, cols, vals = [], [], []
        for row, text in enumerate(texts):
            for token in _TOKEN.findall(text.lower()):
                idx, val = self._token(token)
                rows.append(np.full(len(idx), row, dtype=np.int64))
                cols.append(idx)
                vals.append(val)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if rows:
            np.add.at(out, (np.concatenate(rows), np.concatenate(cols)), np.concatenate(vals))
        return unit_rows(out)

    def _token(self, token: str) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        cached = self._tokens.get(token)
        if cached is not None:
            return cached
        padded = f"<{token}>"
        features = [f"w:{token}"] + [f"c:{padded[i : i + 3]}" for i in range(len(padded) - 2)]
        weights = [1.0] + [0.5] * (len(features) - 1)
        hashes = [zlib.crc32(f.encode()) for f in features]
        idx = np.array([h % self.dim for h in hashes], dtype=np.int64)
        sign = np.array([1.0 if h & 0x8000_0000 else -1.0 for h in hashes], dtype=np.float32)
        entry = (idx, sign * np.array(weights, dtype=np.float32))
        if len(self._tokens) >= _CACHE_LIMIT:
            self._tokens.clear()
        self._tokens[token] = entry
        return entry

    def statistics(self) -> EmbedderStatistics:
        return EmbedderStatistics(texts=self._texts, requests=0, tokens=0, truncated=0)

    async def aclose(self) -> None:
        self._closed = True

    async def __aenter__(self) -> HashingEmbedder:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


# -- OpenAI --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Batch:
    first: int
    texts: list[str]


class OpenAIEmbedder:
    """The OpenAI embeddings API (or any server speaking it, via ``base_url``)."""

    def __init__(
        self,
        model: str = "text-embedding-3-small",
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        dimensions: int | None = None,
        max_concurrency: int = 4,
        batch_size: int = MAX_INPUTS_PER_REQUEST,
        max_request_tokens: int = MAX_TOKENS_PER_REQUEST,
        max_input_tokens: int = MAX_TOKENS_PER_INPUT,
        max_retries: int = 5,
        timeout: float = 60.0,
    ) -> None:
        import openai

        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise ConfigurationError("no OpenAI API key: set OPENAI_API_KEY or pass api_key")
        if not 1 <= batch_size <= MAX_INPUTS_PER_REQUEST:
            raise ConfigurationError(f"batch_size must be 1..{MAX_INPUTS_PER_REQUEST}")
        if max_concurrency < 1 or max_input_tokens < 1 or max_request_tokens < max_input_tokens:
            raise ConfigurationError(
                "need max_concurrency >= 1 and max_request_tokens >= max_input_tokens >= 1"
            )
        dim = dimensions or _MODEL_DIMS.get(model)
        if dim is None:
            raise ConfigurationError(f"unknown dimension of model {model!r}: pass dimensions=")
        self.model = model
        self.dim = dim
        self.dimensions = dimensions
        self.name = f"openai:{model}" + (f":{dimensions}" if dimensions else "")
        self.batch_size = batch_size
        self.max_request_tokens = max_request_tokens
        self.max_input_tokens = max_input_tokens
        self.max_concurrency = max_concurrency
        self._client = openai.AsyncOpenAI(
            api_key=key,
            base_url=base_url or os.environ.get("OPENAI_BASE_URL") or None,
            max_retries=max_retries,
            timeout=timeout,
        )
        self.base_url = str(self._client.base_url)
        self._limit: anyio.Semaphore | None = None
        self._fatal: ConfigurationError | None = None
        self._closed = False
        self._texts = self._requests = self._tokens = self._truncated = 0

    async def embed(self, texts: Sequence[str]) -> Vectors:
        if self._closed:
            raise Closed("the embedder is closed")
        if self._fatal is not None:
            raise ConfigurationError(self._fatal.message) from self._fatal
        prepared = self._prepare(as_texts(texts))
        if not prepared:
            return zeros(self.dim)
        batches = self._plan(prepared)
        results: list[Vectors | None] = [None] * len(batches)
        failures: list[DeltalogError] = []

        async def run(i: int, batch: _Batch, scope: anyio.CancelScope) -> None:
            try:
                results[i] = await self._request(batch)
            except DeltalogError as exc:
                failures.append(exc)
                scope.cancel()

        async with anyio.create_task_group() as tg:
            for i, batch in enumerate(batches):
                tg.start_soon(run, i, batch, tg.cancel_scope)
        if failures:
            raise failures[0]  # the others were cancelled or failed the same way
        self._texts += len(prepared)
        return np.concatenate([r for r in results if r is not None])

    def _prepare(self, texts: list[str]) -> list[str]:
        out = []
        for i, text in enumerate(texts):
            if not text:
                raise InvalidInput(f"texts[{i}] is empty: the OpenAI API refuses empty inputs")
            data = text.encode()
            if len(data) > self.max_input_tokens:
                text = data[: self.max_input_tokens].decode("utf-8", "ignore")
                self._truncated += 1
                log.warning(
                    "texts[%d] truncated from %d to %d bytes (the model's input limit)",
                    i,
                    len(data),
                    len(text.encode()),
                )
            out.append(text)
        return out

    def _plan(self, texts: list[str]) -> list[_Batch]:
        """Consecutive batches within the input and token limits of one request."""
        batches: list[_Batch] = []
        current: list[str] = []
        tokens = 0
        first = 0
        for i, text in enumerate(texts):
            cost = len(text.encode())
            if current and (
                len(current) >= self.batch_size or tokens + cost > self.max_request_tokens
            ):
                batches.append(_Batch(first, current))
                current, tokens, first = [], 0, i
            current.append(text)
            tokens += cost
        batches.append(_Batch(first, current))
        return batches

    async def _request(self, batch: _Batch) -> Vectors:
        import openai

        if self._limit is None:
            self._limit = anyio.Semaphore(self.max_concurrency)
        async with self._limit:
            try:
                if self.dimensions:
                    response = await self._client.embeddings.create(
                        input=batch.texts,
                        model=self.model,
                        encoding_format="base64",
                        dimensions=self.dimensions,
                    )
                else:
                    response = await self._client.embeddings.create(
                        input=batch.texts, model=self.model, encoding_format="base64"
                    )
            except openai.OpenAIError as exc:
                raise self._translate(exc) from exc
        self._requests += 1
        if response.usage is not None:
            self._tokens += response.usage.total_tokens
        return self._decode(response, len(batch.texts))

    def _decode(self, response: CreateEmbeddingResponse, count: int) -> Vectors:
        data = sorted(response.data, key=lambda item: item.index)
        if [item.index for item in data] != list(range(count)):
            raise DataError(
                f"{self.base_url} returned embeddings for indexes "
                f"{[item.index for item in data][:10]} for {count} inputs"
            )
        rows = [_vector(cast(object, item.embedding)) for item in data]
        if any(len(row) != self.dim for row in rows):
            got = next(len(row) for row in rows if len(row) != self.dim)
            raise ConfigurationError(
                f"model {self.model!r} returned {got}-dimensional vectors, expected {self.dim}: "
                "pass dimensions= matching the model"
            )
        return np.stack(rows).astype(np.float32, copy=False)

    def _translate(self, exc: Exception) -> DeltalogError:
        import openai

        if isinstance(exc, openai.AuthenticationError):
            fatal = ConfigurationError(
                f"invalid OpenAI API key: {self.base_url} answered 401; "
                "set OPENAI_API_KEY to a valid key"
            )
            self._fatal = fatal
            return fatal
        if isinstance(exc, openai.APIStatusError):
            return _status_error(exc, self.model, self.base_url)
        if isinstance(exc, openai.APIConnectionError):
            return Unavailable(f"cannot reach {self.base_url}: {exc}", ambiguous=True)
        return Unavailable(f"embedding request failed: {exc}")

    def statistics(self) -> EmbedderStatistics:
        return EmbedderStatistics(
            texts=self._texts,
            requests=self._requests,
            tokens=self._tokens,
            truncated=self._truncated,
        )

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._client.close()

    async def __aenter__(self) -> OpenAIEmbedder:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _vector(data: object) -> npt.NDArray[np.float32]:
    """One embedding as sent: base64 little-endian float32, or a list of floats."""
    if isinstance(data, str):
        return np.frombuffer(base64.b64decode(data), dtype="<f4").astype(np.float32)
    return np.asarray(data, dtype=np.float32)


def _status_error(exc: openai.APIStatusError, model: str, base_url: str) -> DeltalogError:
    status = exc.status_code
    message = _api_message(exc)
    if status == 403:
        return ConfigurationError(f"OpenAI refused access to model {model!r} (403): {message}")
    if status == 404:
        return ConfigurationError(
            f"model {model!r} not found at {base_url} (404): check the model and OPENAI_BASE_URL"
        )
    if status == 429 and _api_code(exc) == "insufficient_quota":
        return ConfigurationError(f"the OpenAI account is out of quota (429): {message}")
    if status in (408, 409, 429) or status >= 500:
        return Unavailable(f"OpenAI embeddings failed after retries (HTTP {status}): {message}")
    return InvalidInput(f"OpenAI refused the request (HTTP {status}): {message}")


def _api_error(exc: openai.APIStatusError) -> Mapping[str, object]:
    body = exc.body
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            return cast(Mapping[str, object], inner)
    return {}


def _api_message(exc: openai.APIStatusError) -> str:
    message = _api_error(exc).get("message")
    return str(message) if message else exc.message


def _api_code(exc: openai.APIStatusError) -> str | None:
    code = _api_error(exc).get("code")
    return str(code) if code else None


# -- choosing ------------------------------------------------------------------


def default_embedder(
    *, dim: int | None = None, env: Mapping[str, str] | None = None
) -> OpenAIEmbedder | WordLlamaEmbedder:
    """OpenAI when ``OPENAI_API_KEY`` is set, else the offline WordLlama model."""
    env = os.environ if env is None else env
    key = env.get("OPENAI_API_KEY")
    if key:
        return OpenAIEmbedder(api_key=key, base_url=env.get("OPENAI_BASE_URL"), dimensions=dim)
    try:
        return WordLlamaEmbedder(dim or DEFAULT_WORDLLAMA_DIM)
    except ConfigurationError as exc:
        raise ConfigurationError(
            f"OPENAI_API_KEY is not set, so the embedder is WordLlama (auto): {exc.message}"
        ) from exc


def make_embedder(kind: str = "auto", *, dim: int | None = None) -> Embedder:
    """The embedder named on a command line: ``auto``, ``openai``, ``wordllama`` or ``hash``."""
    if kind == "auto":
        return default_embedder(dim=dim)
    if kind == "openai":
        return OpenAIEmbedder(dimensions=dim)
    if kind == "wordllama":
        return WordLlamaEmbedder(dim or DEFAULT_WORDLLAMA_DIM)
    if kind == "hash":
        return HashingEmbedder(dim or DEFAULT_HASH_DIM)
    raise InvalidInput(f"unknown embedder {kind!r}: use {', '.join(EMBEDDER_KINDS)}")
