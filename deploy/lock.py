"""Write deploy/requirements.lock: every package the Lambda image installs, pinned with hashes.

    python deploy/lock.py        # from the repository root, with network access to the index

The image (deploy/Dockerfile) runs on the Lambda base image's CPython 3.12 on
x86_64 and installs exactly this file with ``pip --require-hashes
--only-binary=:all:``, then deltalog itself without dependencies. So two
builds months apart install the same bytes, and every snapshot a deployment
writes comes from the same Chroma.

What is locked: deltalog's dependencies and its ``aws`` and ``wordllama``
extras (read from pyproject.toml), plus setuptools to build deltalog,
resolved by pip's own resolver for that platform (``pip install --dry-run
--report``), with chromadb held at the version installed where this runs
(the one the tests ran against). Run it again to move the pins; the tests
(tests/deploy/test_image.py) check that the lock covers pyproject's
requirements and pins the tested chromadb.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "deploy" / "requirements.lock"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
EXTRAS = ("aws", "wordllama")
BUILD = ("setuptools>=77",)


def requirements() -> list[str]:
    """What the image needs: deltalog's requirements, its image extras, the build backend."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in EXTRAS:
        wanted += project["optional-dependencies"][extra]
    return [*wanted, *BUILD, f"chromadb=={importlib.metadata.version('chromadb')}"]


def resolve(wanted: list[str]) -> list[dict[str, object]]:
    """pip's resolution for CPython 3.12 on x86_64 Linux, wheels only: its report's installs."""
    with tempfile.TemporaryDirectory() as target:
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--ignore-installed",
            "--only-binary=:all:",
            "--python-version=3.12",
            "--implementation=cp",
            "--abi=cp312",
            *platforms,
            f"--target={target}",
            "--report=-",
            *wanted,
        ]
        report = json.loads(subprocess.run(command, check=True, capture_output=True).stdout)
    installs: list[dict[str, object]] = report["install"]
    return installs


def canonical(name: str) -> str:
    """A distribution's name as PEP 503 normalizes it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lines(installs: list[dict[str, object]]) -> list[str]:
    found = []
    for item in installs:
        metadata = item["metadata"]
        download = item["download_info"]
        assert isinstance(metadata, dict) and isinstance(download, dict)
        digest = download["archive_info"]["hashes"]["sha256"]
        name = canonical(str(metadata["name"]))
        found.append(f"{name}=={metadata['version']} --hash=sha256:{digest}")
    return sorted(found)


def main() -> None:
    pinned = lines(resolve(requirements()))
    header = [
        "# Every package deploy/Dockerfile installs, with its hash: written by deploy/lock.py",
        "# (CPython 3.12, x86_64 manylinux wheels). Do not edit by hand: run the script.",
    ]
    LOCK.write_text("\n".join([*header, *pinned]) + "\n")
    print(f"wrote {len(pinned)} pins to {LOCK.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
