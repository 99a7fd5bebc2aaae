"""The WordLlama embedder: the real model from the installed wheel, with no network.

Every test here runs with sockets refused (``tests.network``): the model
loads and embeds from the wheel's files only. The semantic ranking pairs
were chosen and committed before the model was run on them
(``tests/receipts/ranking_pairs.py``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest

from deltalog.errors import Closed, ConfigurationError, InvalidInput
from deltalog.receipts.embed import (
    HashingEmbedder,
    OpenAIEmbedder,
    default_embedder,
    make_embedder,
)
from deltalog.receipts.generate import generate_receipts
from deltalog.receipts.ingest import receipt_key
from deltalog.receipts.model import word_inputs
from deltalog.receipts.wordllama import NORMALISATION, WordLlamaEmbedder, normalise
from tests.network import NetworkGuard, no_network
from tests.receipts.ranking_pairs import PAIRS, RankingPair

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def offline() -> Iterator[NetworkGuard]:
    """No socket may connect anywhere, loopback included, for the whole module."""
    with no_network(loopback=False) as guard:
        yield guard
    assert guard.attempts == []


@pytest.fixture(scope="module")
async def model(offline: NetworkGuard) -> AsyncIterator[WordLlamaEmbedder]:
    embedder = WordLlamaEmbedder()
    await embedder.load()
    yield embedder
    await embedder.aclose()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- meaning ---------------------------------------------------------------------


@pytest.mark.parametrize("pair", PAIRS, ids=[f"{p.query}>{p.related}" for p in PAIRS])
async def test_a_related_text_ranks_above_an_unrelated_one(
    model: WordLlamaEmbedder, pair: RankingPair
) -> None:
    query, related, unrelated = await model.embed(list(pair))
    assert cosine(query, related) > cosine(query, unrelated), pair


# -- the contract of an embedder -------------------------------------------------


async def test_vectors_are_float32_unit_rows_in_input_order(model: WordLlamaEmbedder) -> None:
    texts = [f"{word} {i}" for i, word in enumerate(["TOTAL", "VISA", "AVOCADO", "TAX"] * 40)]
    vectors = await model.embed(texts)
    assert vectors.dtype == np.float32 and vectors.shape == (160, 256)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    backwards = await model.embed(texts[::-1])
    assert np.allclose(backwards[::-1], vectors, atol=1e-6)
    one_by_one = np.concatenate([await model.embed([t]) for t in texts[:12]])
    assert np.allclose(one_by_one, vectors[:12], atol=1e-6)


async def test_deterministic_across_instances_and_calls(model: WordLlamaEmbedder) -> None:
    texts = word_inputs(next(generate_receipts(1, seed=3)))
    first = await model.embed(texts)
    assert np.array_equal(await model.embed(texts), first)
    async with WordLlamaEmbedder() as other:
        assert other.name == model.name
        assert np.array_equal(await other.embed(texts), first)


async def test_concurrent_calls_each_get_their_own_rows(model: WordLlamaEmbedder) -> None:
    batches = [[f"{i} {word}" for word in ("TOTAL", "CASH", "MILK")] for i in range(16)]
    results: dict[int, np.ndarray] = {}

    async def one(i: int) -> None:
        results[i] = await model.embed(batches[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(batches)):
            tg.start_soon(one, i)
    for i, batch in enumerate(batches):
        assert np.array_equal(results[i], model.embed_sync(batch)), i


async def test_normalisation_is_in_the_name_and_applied(model: WordLlamaEmbedder) -> None:
    assert model.name == f"wordllama:l2_supercat:256:{NORMALISATION}"
    assert normalise("<EDGE> <EDGE>  **** TOTAL\n45.67 <EDGE>") == "**** total 45.67"
    upper, lower, padded = await model.embed(["VISA CARD", "visa card", "<EDGE> VISA CARD <EDGE>"])
    assert np.array_equal(upper, lower) and np.array_equal(upper, padded)


async def test_edge_cases(model: WordLlamaEmbedder) -> None:
    assert (await model.embed([])).shape == (0, 256)
    blank = await model.embed(["", "   ", "<EDGE>"])
    assert blank.shape == (3, 256) and not blank.any()  # nothing to embed: zeros, not NaN
    with pytest.raises(InvalidInput, match="not one string"):
        await model.embed("TOTAL")
    with pytest.raises(InvalidInput, match=r"texts\[1\] is int"):
        await model.embed(["TOTAL", 7])  # type: ignore[list-item]


async def test_a_closed_embedder_refuses(offline: NetworkGuard) -> None:
    embedder = WordLlamaEmbedder(64)
    await embedder.aclose()
    with pytest.raises(Closed):
        await embedder.embed(["TOTAL"])


async def test_smaller_dims_are_truncations_of_the_same_model(model: WordLlamaEmbedder) -> None:
    texts = ["COSTCO WHOLESALE", "ORGANIC BANANAS"]
    async with WordLlamaEmbedder(64) as small:
        assert small.name == f"wordllama:l2_supercat:64:{NORMALISATION}"
        vectors = await small.embed(texts)
    assert vectors.shape == (2, 64)
    assert small.statistics().load_seconds > 0
    full = await model.embed(texts)
    # the first 64 dims of the full vectors, scaled to length 1
    head = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    assert np.allclose(vectors, head, atol=1e-5)


async def test_statistics_count_texts_and_calls(offline: NetworkGuard) -> None:
    async with WordLlamaEmbedder(128) as embedder:
        assert embedder.statistics().load_seconds == 0.0  # nothing loaded before the first embed
        await embedder.embed(["TOTAL", "TAX"])
        await embedder.embed(["CASH"])
        stats = embedder.statistics()
    assert (stats.texts, stats.requests, stats.truncated) == (3, 2, 0)
    assert stats.load_seconds > 0


# -- the name goes into idempotency keys ------------------------------------------


def test_a_change_of_name_changes_the_idempotency_keys(offline: NetworkGuard) -> None:
    receipt = next(generate_receipts(1, seed=5))
    embedder = WordLlamaEmbedder()
    key = receipt_key(receipt, embedder)
    assert receipt_key(receipt, WordLlamaEmbedder()) == key
    renamed = WordLlamaEmbedder()
    renamed.name = embedder.name.replace(NORMALISATION, "lower")  # another normalisation
    assert receipt_key(receipt, renamed) != key
    assert receipt_key(receipt, WordLlamaEmbedder(128)) != key
    assert receipt_key(receipt, HashingEmbedder(256)) != key


# -- choosing, and what is refused ------------------------------------------------


async def test_auto_is_openai_with_a_key_else_wordllama(offline: NetworkGuard) -> None:
    assert isinstance(default_embedder(env={}), WordLlamaEmbedder)
    async with default_embedder(env={"OPENAI_API_KEY": "sk-x"}) as online:
        assert isinstance(online, OpenAIEmbedder)
    assert isinstance(make_embedder("wordllama", dim=64), WordLlamaEmbedder)
    assert make_embedder("wordllama", dim=64).dim == 64
    assert isinstance(make_embedder("hash"), HashingEmbedder)
    with pytest.raises(InvalidInput, match="auto, openai, wordllama, hash"):
        make_embedder("minilm")


def test_without_wordllama_installed_auto_says_how_to_install(
    offline: NetworkGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wordllama", None)  # what find_spec and import see
    with pytest.raises(ConfigurationError) as refused:
        default_embedder(env={})
    message = str(refused.value)
    assert "OPENAI_API_KEY is not set" in message
    assert "pip install 'deltalog[wordllama]'" in message
    assert "--embedder hash" in message
    with pytest.raises(ConfigurationError, match="not installed"):
        make_embedder("wordllama")


def test_dimensions_the_wheel_does_not_ship_are_refused(offline: NetworkGuard) -> None:
    with pytest.raises(ConfigurationError, match=r"must be 64, 128, 256 .* got 100"):
        WordLlamaEmbedder(100)
    with pytest.raises(ConfigurationError, match="got 1024"):
        WordLlamaEmbedder(1024)  # WordLlama has it, in a file the wheel does not ship


def broken_install(root: Path, model: WordLlamaEmbedder, *, weights: bytes | None) -> Path:
    """A ``wordllama`` package under ``root``: the real one, with other weights (or none)."""
    package = root / "wordllama"
    package.mkdir()
    for item in model.package.iterdir():
        if item.name not in ("weights", "__pycache__"):
            (package / item.name).symlink_to(item)
    (package / "weights").mkdir()
    if weights is not None:
        (package / "weights" / "l2_supercat_256.safetensors").write_bytes(weights)
    return root


def test_a_missing_weight_file_says_how_to_install(
    model: WordLlamaEmbedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(broken_install(tmp_path, model, weights=None)))
    monkeypatch.delitem(sys.modules, "wordllama", raising=False)  # found anew, not imported
    with pytest.raises(ConfigurationError) as refused:
        WordLlamaEmbedder()
    message = str(refused.value)
    assert f"{tmp_path}/wordllama/weights/l2_supercat_256.safetensors is missing" in message
    assert "pip install --force-reinstall 'deltalog[wordllama]'" in message


def test_a_tokenizer_missing_at_load_is_an_error_and_never_a_download(
    model: WordLlamaEmbedder, tmp_path: Path
) -> None:
    """The files were there when the embedder was made, the tokenizer is gone when it
    loads: wordllama would fetch it from its model hub unless told not to. The load
    fails, and nothing tried to connect (the guard records attempts that wordllama's
    own error handling would swallow)."""
    embedder = WordLlamaEmbedder()
    package = tmp_path / "wordllama"
    (package / "weights").mkdir(parents=True)
    (package / "tokenizers").mkdir()
    weights = "weights/l2_supercat_256.safetensors"
    (package / weights).symlink_to(model.package / weights)
    embedder.package = package
    with no_network(loopback=False) as guard, pytest.raises(ConfigurationError) as refused:
        embedder.embed_sync(["TOTAL"])
    assert guard.attempts == []
    assert f"cannot load the WordLlama model from {package}" in str(refused.value)


def test_a_corrupt_weight_file_is_a_configuration_error(
    model: WordLlamaEmbedder, tmp_path: Path
) -> None:
    """In a fresh process, whose ``import wordllama`` finds the broken install first."""
    root = broken_install(tmp_path, model, weights=uuid.uuid4().bytes * 64)
    script = (
        "from deltalog.errors import ConfigurationError\n"
        "from deltalog.receipts.wordllama import WordLlamaEmbedder\n"
        "embedder = WordLlamaEmbedder()\n"
        "try:\n"
        "    embedder.embed_sync(['TOTAL'])\n"
        "except ConfigurationError as exc:\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{ROOT}"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"cannot load the WordLlama model from {root}/wordllama" in done.stdout
    assert "pip install --force-reinstall 'deltalog[wordllama]'" in done.stdout


def test_importing_wordllama_leaves_logging_alone(tmp_path: Path) -> None:
    """wordllama configures the root logger on import; the embedder undoes it.

    In a fresh process, since the import happens once per process.
    """
    script = (
        "import logging\n"
        "from deltalog.receipts.wordllama import WordLlamaEmbedder\n"
        "WordLlamaEmbedder().embed_sync(['TOTAL'])\n"
        "root = logging.getLogger()\n"
        "print(len(root.handlers), root.level)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", str(logging.WARNING)]
    assert done.stderr == ""
