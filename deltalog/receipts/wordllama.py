"""WordLlama: a real embedding model that ships inside its wheel, used offline.

Vocabulary:

- **the model**: WordLlama's ``l2_supercat`` token embeddings (Llama 2's
  32,000 tokens, 256 dims), distilled from large language models and
  shipped in the ``wordllama`` wheel (``wordllama/weights/
  l2_supercat_256.safetensors``, 16 MB, with its tokenizer). A text's
  vector is the mean of its tokens' vectors, scaled to length 1. Static: no
  context, no GPU, never a download.
- **dim**: 256 (the default), 128 or 64: the first dims of the 256, which
  the model was trained to keep meaningful (Matryoshka). WordLlama's 512
  and 1024 dims are other files, which the wheel does not ship.
- **normalisation** (``NORMALISATION``, part of ``name`` and so of every
  idempotency key): receipts are upper-case OCR and the tokenizer is
  case-sensitive (``TOTAL`` is ``T``+``OT``+``AL``, ``total`` one token), so
  texts are lower-cased; the ``<EDGE>`` padding of word and line inputs is
  dropped (it is no receipt text, and in a five-word input it outweighs the
  word); runs of white space become one space. README "Embedders" has the
  measurements behind each step.
- **loading**: the constructor only checks that the files are there (a
  missing one is a ``ConfigurationError`` saying how to install it); the
  weights load in a worker thread on the first ``embed`` (about 0.5 s).
"""

from __future__ import annotations

import importlib.util
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import anyio
import numpy as np

from deltalog.errors import Closed, ConfigurationError
from deltalog.receipts.model import EDGE
from deltalog.receipts.vectors import (
    EmbedderStatistics,
    Vectors,
    as_batch,
    as_texts,
    unit_rows,
    zeros,
)

if TYPE_CHECKING:
    from types import ModuleType

__all__ = [
    "DEFAULT_WORDLLAMA_DIM",
    "INSTALL_HINT",
    "NORMALISATION",
    "WORDLLAMA_DIMS",
    "WordLlamaEmbedder",
    "normalise",
]

CONFIG = "l2_supercat"
SHIPPED_DIM = 256
DEFAULT_WORDLLAMA_DIM = 256
WORDLLAMA_DIMS = (64, 128, 256)
NORMALISATION = "lower+no-edge"
OTHER_EMBEDDER = "choose another embedder (--embedder hash, or openai with OPENAI_API_KEY)"
INSTALL_HINT = (
    "install it with pip install 'deltalog[wordllama]' (the demo's and the test command's "
    f"extras include it), or {OTHER_EMBEDDER}"
)
_BATCH = 64
"""Texts per tokenizer call: sorted by length, each batch is padded to its longest."""
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """What the model is given for ``text``: see the module docstring."""
    return _SPACE.sub(" ", text.replace(EDGE, " ").lower()).strip()


def _installed() -> Path:
    """The installed ``wordllama`` package holding both model files, found without importing it."""
    spec = importlib.util.find_spec("wordllama")
    if spec is None or spec.origin is None:
        raise ConfigurationError(f"the WordLlama model is not installed: {INSTALL_HINT}")
    package = Path(spec.origin).parent
    for path in _files(package):
        if not path.is_file():
            raise ConfigurationError(
                f"the WordLlama model file {path} is missing: reinstall wordllama "
                f"(pip install --force-reinstall 'deltalog[wordllama]') or {OTHER_EMBEDDER}"
            )
    return package


def _files(package: Path) -> tuple[Path, Path]:
    """The weight file and the tokenizer the wheel ships."""
    return (
        package / "weights" / f"{CONFIG}_{SHIPPED_DIM}.safetensors",
        package / "tokenizers" / f"{CONFIG}_tokenizer_config.json",
    )


@contextmanager
def _root_logging_kept() -> Iterator[None]:
    """Undo what importing wordllama does to the root logger.

    wordllama's ``__init__`` and ``inference`` modules call
    ``logging.basicConfig(level=INFO)`` on import, which would print every
    library's INFO records to stderr in a program that configured no logging.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


def _import_wordllama() -> ModuleType:
    with _root_logging_kept():
        import wordllama
    return cast("ModuleType", wordllama)


def _load(package: Path, dim: int) -> Any:
    """The model as a ``wordllama.WordLlamaInference``, from the wheel's files only.

    Tested with wordllama 0.4.0 (pinned in pyproject.toml). Its
    ``WordLlama.load()`` looks for the packaged tokenizer under
    ``wordllama/tokenizer/`` (singular) while the wheel ships it under
    ``wordllama/tokenizers/``, so the default call tries to download it.
    Passing the package directory as ``cache_dir`` makes wordllama's cache
    layout (``weights/``, ``tokenizers/``) match the wheel's, and
    ``disable_download=True`` turns any file still missing into an error
    instead of a download. This is the only place that loads the model.
    """
    wordllama = _import_wordllama()
    return wordllama.WordLlama.load(
        config=CONFIG,
        cache_dir=package,
        dim=SHIPPED_DIM,
        trunc_dim=dim if dim < SHIPPED_DIM else None,
        disable_download=True,
    )


def _embed(model: Any, texts: list[str], dim: int, fix: Callable[[str], str]) -> Vectors:
    """Unit vectors of ``texts`` (normalised by ``fix``) in their order, by ``model.embed``."""
    # Texts of similar length share a batch: each batch is padded to its longest.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    vectors = model.embed([fix(texts[i]) for i in order], batch_size=_BATCH)
    out = np.empty((len(texts), dim), dtype=np.float32)
    out[order] = vectors
    return unit_rows(out)


class WordLlamaEmbedder:
    """WordLlama's static embeddings, offline; see the module docstring.

    A subclass may change ``normalisation`` and ``normalise`` together: the
    name, and so every idempotency key, follows.
    """

    normalisation = NORMALISATION

    def normalise(self, text: str) -> str:
        """What the model is given for ``text``."""
        return normalise(text)

    def __init__(self, dim: int = DEFAULT_WORDLLAMA_DIM) -> None:
        if dim not in WORDLLAMA_DIMS:
            raise ConfigurationError(
                f"WordLlama's dim must be {', '.join(map(str, WORDLLAMA_DIMS))} (the wheel "
                f"ships the {SHIPPED_DIM}-dim model and its truncations), got {dim}"
            )
        self.dim = dim
        self.name = f"wordllama:{CONFIG}:{dim}:{self.normalisation}"
        self.package = _installed()
        self._model: Any = None
        self._loading: anyio.Lock | None = None
        self._closed = False
        self._texts = self._calls = 0
        self._load_seconds = 0.0

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """Shape ``(len(texts), dim)``, float32, unit rows, in input order."""
        batch = as_batch(texts, closed=self._closed)
        if not batch:
            return zeros(self.dim)
        model = await self._loaded()
        vectors = await anyio.to_thread.run_sync(_embed, model, batch, self.dim, self.normalise)
        self._texts += len(batch)
        self._calls += 1
        return vectors

    def embed_sync(self, texts: Sequence[str]) -> Vectors:
        """``embed`` without a worker thread (loads the model if needed)."""
        batch = as_texts(texts)
        if not batch:
            return zeros(self.dim)
        model = self._model if self._model is not None else self._load_sync()
        vectors = _embed(model, batch, self.dim, self.normalise)
        self._texts += len(batch)
        self._calls += 1
        return vectors

    async def load(self) -> None:
        """Load the weights now (in a worker thread) rather than at the first ``embed``."""
        await self._loaded()

    async def _loaded(self) -> Any:
        if self._loading is None:
            self._loading = anyio.Lock()
        async with self._loading:
            if self._closed:
                raise Closed("the embedder is closed")
            model = self._model
            if model is None:
                model = await anyio.to_thread.run_sync(self._load_sync)
            return model

    def _load_sync(self) -> Any:
        started = time.perf_counter()
        try:
            model = _load(self.package, self.dim)
        except Exception as exc:  # the seam: whatever wordllama raises, the setup is at fault
            raise ConfigurationError(
                f"cannot load the WordLlama model from {self.package}: {exc}; reinstall it "
                f"(pip install --force-reinstall 'deltalog[wordllama]') or {OTHER_EMBEDDER}"
            ) from exc
        self._load_seconds = time.perf_counter() - started
        self._model = model
        return model

    def statistics(self) -> EmbedderStatistics:
        return EmbedderStatistics(
            texts=self._texts,
            requests=self._calls,
            tokens=0,
            truncated=0,
            load_seconds=self._load_seconds,
        )

    async def aclose(self) -> None:
        self._closed = True
        self._model = None

    async def __aenter__(self) -> WordLlamaEmbedder:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
