"""The README's examples run, and print what the README shows.

- **Python blocks**: every ```` ```python ```` block of the README is a
  program, run as its own process in README order against an endpoint of
  this module's own (moto's S3 + DynamoDB, as ``deltalog endpoint`` runs
  it), with ``AWS_ENDPOINT_URL`` and moto's fake credentials in the
  environment, in one working directory. A block may say, in an HTML comment
  on the line before it, ``<!-- readme-test: setup NAME -->`` (it runs after
  the named setup of this module) or ``<!-- readme-test: skip (REASON) -->``
  (it cannot run here; the reason is required). A new block is run without
  anyone adding it here.
- **The shell session**: the block marked ``<!-- readme-test: session -->``
  runs in ``bash`` against ``deltalog endpoint``, started as the README's
  block marked ``<!-- readme-test: endpoint -->`` shows; the ``export`` line
  the session starts with must be the one the endpoint prints. The last
  command's table must hold the rows of the block marked ``<!-- readme-test:
  output -->`` (documents, merchants and ids; distances within 0.001).
- The only substitutions are the ports: the endpoint's 4566 and Chroma's
  8000 become free ports, so the test never collides with a server of its
  machine.

The session (run once for the module) ingests 20 receipts with WordLlama
and compacts them (about 2,200 vectors), and the mirror setup copies them
into a ``chroma run`` server: 30-60 s each on a loaded 2-core machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deltalog.storage.endpoint import EmbeddedEndpoint
from tests.chroma_server import ChromaServer, free_port
from tests.commands import cli_env

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"^<!-- readme-test: (.+?) -->$")
SKIP = re.compile(r"^skip \((.+)\)$")
ENDPOINT_PORT, CHROMA_PORT = "4566", "8000"
SECONDS = 300


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    code: str
    marker: str | None
    """What the HTML comment on the line before the block says, if any."""


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block of the README, with the marker just before it."""
    lines = text.splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marked = MARKER.match(before.strip())
        code = "\n".join(lines[i + 1 : end]) + "\n"
        found.append(Block(i + 1, fence.group(1), code, marked.group(1) if marked else None))
        i = end + 1
    return found


def blocks(lang: str | None = None, marker: str | None = None) -> list[Block]:
    every = readme_blocks(README.read_text())
    return [
        b
        for b in every
        if (lang is None or b.lang == lang) and (marker is None or b.marker == marker)
    ]


def the(marker: str) -> Block:
    (block,) = blocks(marker=marker)
    return block


# -- the environment ------------------------------------------------------------------


@dataclass
class Place:
    """Where the examples run: the endpoint, a Chroma server, a working directory."""

    endpoint: str
    chroma_port: int
    work: Path
    env: dict[str, str]

    def ported(self, code: str) -> str:
        """The README's code with the documented ports replaced by this place's."""
        port = self.endpoint.rsplit(":", 1)[1]
        return code.replace(ENDPOINT_PORT, port).replace(CHROMA_PORT, str(self.chroma_port))


def _env(**extra: str) -> dict[str, str]:
    """The tests' environment for a user's shell: deltalog on PATH, no OpenAI key (the
    README's default embedder is then the offline WordLlama model)."""
    env = cli_env(**extra)
    env.pop("OPENAI_API_KEY", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def chroma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChromaServer]:
    with ChromaServer(tmp_path_factory.mktemp("chroma") / "db") as server:
        yield server


@pytest.fixture
def place(tmp_path: Path, chroma: ChromaServer) -> Iterator[Place]:
    """A fresh endpoint per test (the examples use fixed names: my-bucket, deltalog)."""
    with EmbeddedEndpoint() as endpoint:
        work = tmp_path / "work"
        work.mkdir()
        env = _env(AWS_ENDPOINT_URL=endpoint.url)
        yield Place(endpoint.url, chroma.port, work, env)


def run(place: Place, argv: list[str], what: str) -> str:
    done = subprocess.run(
        argv,
        cwd=place.work,
        env=place.env,
        capture_output=True,
        text=True,
        timeout=SECONDS,
        check=False,
    )
    assert done.returncode == 0, f"{what} failed:\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, f"{what}:\n{done.stderr}"
    return done.stdout


def run_python(place: Place, block: Block) -> str:
    script = place.work / f"readme_line_{block.line}.py"
    script.write_text(place.ported(block.code))
    return run(
        place, [sys.executable, str(script)], f"the README's python block at line {block.line}"
    )


@dataclass
class Session:
    """The README's shell session, run once for the module: what it printed, and where."""

    output: str
    place: Place


@pytest.fixture(scope="module")
def session(chroma: ChromaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """``deltalog endpoint`` as the README starts it, then the session in ``bash``."""
    port = free_port()
    command = the("endpoint").code.split("#", 1)[0].replace(ENDPOINT_PORT, str(port))
    argv = command.split()
    assert argv[:2] == ["deltalog", "endpoint"] and str(port) in argv, command
    work = tmp_path_factory.mktemp("session")
    env = _env()
    server = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        printed = [server.stdout.readline() for _ in range(3)]
        export = next(line.strip() for line in printed if line.startswith("export "))
        commands = the("session").code.replace(ENDPOINT_PORT, str(port))
        assert commands.splitlines()[0].strip() == export, "it starts with what the endpoint says"
        url = f"http://127.0.0.1:{port}"
        place = Place(url, chroma.port, work, _env(AWS_ENDPOINT_URL=url))
        shell = ["bash", "-euo", "pipefail", "-c", commands]
        output = run(Place(url, chroma.port, work, env), shell, "the README's session")
        yield Session(output, place)
    finally:
        server.terminate()
        server.wait(timeout=30)
        if server.stdout is not None:
            server.stdout.close()


# -- the tests --------------------------------------------------------------------------


SETUPS: dict[str, Callable[[Session], Place]] = {}


def setup(name: str) -> Callable[[Callable[[Session], Place]], Callable[[Session], Place]]:
    def register(func: Callable[[Session], Place]) -> Callable[[Session], Place]:
        SETUPS[name] = func
        return func

    return register


@setup("mirror")
def _mirror(session: Session) -> Place:
    """After the session: the README's ``deltalog mirror ... --once`` into Chroma."""
    place = session.place
    mirror = next(line for line in the("mirror").code.splitlines() if "--once" in line)
    shell = ["bash", "-euo", "pipefail", "-c", place.ported(mirror.split("#", 1)[0])]
    run(place, shell, "the README's mirror --once")
    return place


def test_every_python_block_runs_or_says_why_it_cannot() -> None:
    python = blocks("python")
    assert len(python) >= 4, "the README's snippets are found"
    for block in python:
        if block.marker is None:
            continue
        skip = SKIP.match(block.marker)
        named = block.marker.removeprefix("setup ")
        assert (skip and skip.group(1).strip()) or named in SETUPS, (
            f"line {block.line}: <!-- readme-test: {block.marker} --> is neither a known setup "
            f"({', '.join(SETUPS)}) nor a skip with its reason"
        )
    for marker in ("endpoint", "session", "output", "mirror"):
        assert len(blocks(marker=marker)) == 1, f"one block marked {marker}"


def test_the_python_blocks_run_in_order(place: Place) -> None:
    """Each plain block (no marker) in README order, in one place; they build on each other
    as a reader's would (the log the first one writes, the next compacts and reads)."""
    plain = [b for b in blocks("python") if b.marker is None]
    assert plain
    for block in plain:
        run_python(place, block)


@pytest.mark.parametrize(
    "block",
    [b for b in blocks("python") if (b.marker or "").startswith("setup ")],
    ids=lambda b: f"line-{b.line}",
)
def test_a_block_that_needs_a_setup_runs_after_it(session: Session, block: Block) -> None:
    place = SETUPS[(block.marker or "").removeprefix("setup ")](session)
    run_python(place, block)


def _rows(table: str) -> list[list[str]]:
    """The numbered rows of a results table, as cells."""
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) >= 5 and cells[0].isdigit():
            rows.append(cells)
    return rows


def test_the_shell_session_prints_the_table_the_readme_shows(session: Session) -> None:
    shown = _rows(the("output").code)
    assert shown, "the README shows result rows"
    got = _rows(session.output)
    assert len(got) >= len(shown), got
    for want, have in zip(shown, got, strict=False):
        assert abs(float(want[1]) - float(have[1])) < 1e-3, (want, have)
        assert want[3] == have[3], "the merchant"

    # Equal distances may come in any order: compare each distance's rows as a set.
    def grouped(rows: list[list[str]]) -> set[tuple[str, str, str]]:
        return {(f"{float(r[1]):.3f}", r[2], r[4]) for r in rows}

    assert grouped(shown) == grouped(got[: len(shown)])
