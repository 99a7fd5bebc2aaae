"""``deploy/Dockerfile``: a reproducible image (base pinned by digest, packages from a lock).

The image cannot be built here (no Docker daemon, no registry but the package
indexes): these tests read the Dockerfile, the lock and the pin script, and
run the script against a stand-in resolver.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

from tests.deploy.cfn import ROOT

DEPLOY = ROOT / "deploy"
DIGEST = re.compile(r"^ARG BASE_IMAGE=public\.ecr\.aws/lambda/python:3\.12@sha256:[0-9a-f]{64}$")


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def _lock() -> dict[str, str]:
    """Each locked package's version, its line's hashes checked."""
    locked = {}
    for line in (DEPLOY / "requirements.lock").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-z0-9-]+)==(\S+)( --hash=sha256:[0-9a-f]{64})+", line)
        assert match, f"not a pinned, hashed line: {line}"
        locked[match.group(1)] = match.group(2)
    return locked


def test_the_base_image_is_pinned_by_digest() -> None:
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    (arg,) = [line for line in lines if line.startswith("ARG BASE_IMAGE=")]
    assert DIGEST.match(arg), arg
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms == ["FROM ${BASE_IMAGE}"]


def test_the_image_installs_exactly_the_lock_then_deltalog_without_dependencies() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "--require-hashes --only-binary=:all: -r /tmp/requirements.lock" in text
    assert "--no-deps --no-build-isolation" in text
    assert "pip check" in text
    assert text.count("pip install") == 2


def test_the_lock_covers_every_requirement_and_pins_the_chromadb_the_tests_ran() -> None:
    """Every requirement of deltalog and of the extras the image installs is locked, with
    the build backend; chromadb at the version installed here, so the image writes the
    format the tests read."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in ("aws", "wordllama"):
        wanted += project["optional-dependencies"][extra]
    locked = _lock()
    missing = {_name(r) for r in wanted} - set(locked)
    assert not missing, f"not in deploy/requirements.lock: {missing}: run deploy/lock.py"
    assert "setuptools" in locked
    assert locked["chromadb"] == importlib.metadata.version("chromadb")


def test_the_pin_script_rewrites_the_digest_it_resolves(tmp_path: Path) -> None:
    """With a stand-in ``skopeo`` on the PATH, the script writes the digest it answers."""
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    shutil.copy(DEPLOY / "Dockerfile", deploy / "Dockerfile")
    shutil.copy(DEPLOY / "pin-base-image.sh", deploy / "pin-base-image.sh")
    digest = "sha256:" + "ab" * 32
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    skopeo = bin_ / "skopeo"
    skopeo.write_text(f"#!/bin/sh\necho {digest}\n")
    skopeo.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", str(deploy / "pin-base-image.sh")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"public.ecr.aws/lambda/python:3.12@{digest}"
    text = (deploy / "Dockerfile").read_text()
    assert f"ARG BASE_IMAGE=public.ecr.aws/lambda/python:3.12@{digest}\n" in text
    skopeo.write_text("#!/bin/sh\necho latest\n")  # not a digest: refused, nothing written
    refused = subprocess.run(
        ["bash", str(deploy / "pin-base-image.sh")], env=env, capture_output=True, text=True
    )
    assert refused.returncode != 0 and "unexpected digest" in refused.stderr
    assert (deploy / "Dockerfile").read_text() == text
