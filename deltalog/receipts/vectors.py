"""What every embedder shares: its input check, its statistics, unit vectors.

- ``as_texts``: an embedder takes a sequence of ``str`` (not one string);
  anything else is ``InvalidInput`` naming the index; ``as_batch`` also
  refuses a closed embedder (``Closed``).
- ``EmbedderStatistics``: texts embedded, requests made, tokens counted,
  inputs truncated, and the seconds spent loading a local model.
- ``unit_rows``: rows scaled to length 1 in place; a zero row (a text with
  nothing to embed) stays zero rather than becoming NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from deltalog.entry import Vectors
from deltalog.errors import Closed, InvalidInput

__all__ = ["EmbedderStatistics", "Vectors", "as_batch", "as_texts", "unit_rows", "zeros"]


@dataclass(frozen=True, slots=True)
class EmbedderStatistics:
    texts: int
    requests: int
    """API requests (OpenAI) or worker-thread calls (local models)."""
    tokens: int
    """As reported by the API, or counted by a local model's tokenizer (0 for hashing)."""
    truncated: int
    load_seconds: float = 0.0
    """Time spent loading a local model's weights (0 when there is none)."""


def as_texts(texts: Sequence[str]) -> list[str]:
    """``texts`` as a list, checked: a sequence of ``str``."""
    if isinstance(texts, str):
        raise InvalidInput("embed() takes a sequence of texts, not one string")
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise InvalidInput(f"texts[{i}] is {type(text).__name__}, not str")
    return out


def as_batch(texts: Sequence[str], *, closed: bool) -> list[str]:
    """``as_texts`` for an embedder, which refuses work once closed."""
    if closed:
        raise Closed("the embedder is closed")
    return as_texts(texts)


def zeros(dim: int) -> Vectors:
    """No vectors of dimension ``dim``: the answer to an empty batch."""
    return np.zeros((0, dim), dtype=np.float32)


def unit_rows(vectors: Vectors) -> Vectors:
    """Scale each row to length 1, in place; zero rows stay zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.divide(vectors, norms, out=vectors, where=norms > 0)
    return vectors
