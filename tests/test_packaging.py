"""A built wheel installs and runs outside a checkout.

Builds the wheel with ``python -m build``, installs it (with its declared
dependencies, from the package index pip is configured with) into a fresh
virtual environment, and runs ``deltalog --help`` and an import of the
public API there, from a directory that is not the checkout. Catches what an
editable install hides: a module or data file left out of the wheel, an
entry point that does not resolve, a dependency the metadata does not
declare. Without extras, so also what ``auto`` says when wordllama is not
installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_API = (
    "from deltalog import LogConfig, DeltaLog, Delta, Upsert, Delete, UpdateMetadata, Reader\n"
    "from compactor import Compactor, CompactionResult\n"
    "from deltalog.storage.policy import render\n"
    "import deltalog, compactor\n"
    "assert 'site-packages' in deltalog.__file__, deltalog.__file__\n"
    "assert render('producer', bucket='b', table='t', log='l')['Statement']\n"
    "print('public api ok')\n"
)
WITHOUT_WORDLLAMA = (
    "import os\n"
    "os.environ.pop('OPENAI_API_KEY', None)\n"
    "from deltalog.errors import ConfigurationError\n"
    "from deltalog.receipts.embed import make_embedder\n"
    "assert make_embedder('hash').embed_sync(['TOTAL']).shape == (1, 384)\n"
    "try:\n"
    "    make_embedder('auto')\n"
    "except ConfigurationError as exc:\n"
    "    print(exc)\n"
)


def _run(command: list[str], cwd: Path, timeout: float) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, (command, done.stdout[-3000:], done.stderr[-3000:])
    return done.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
        cwd=tmp_path,
        timeout=300,
    )
    (wheel,) = dist.glob("deltalog-*.whl")
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", str(wheel)], cwd=tmp_path, timeout=500)

    help_text = _run([str(env_dir / "bin" / "deltalog"), "--help"], cwd=tmp_path, timeout=60)
    for command in ("init", "status", "compact", "ingest", "query", "demo"):
        assert command in help_text, help_text
    assert "public api ok" in _run([str(python), "-c", PUBLIC_API], cwd=tmp_path, timeout=60)
    # wordllama is an extra: without it, hash works and auto (no key) says how to install it
    said = _run([str(python), "-c", WITHOUT_WORDLLAMA], cwd=tmp_path, timeout=60)
    assert "OPENAI_API_KEY is not set" in said and "pip install 'deltalog[wordllama]'" in said
