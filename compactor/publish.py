"""Publishing a snapshot: archive the closed working copy, upload it, prune old ones.

The Chroma client must be closed before ``publish`` is called: archiving a
directory while Chroma writes to it produced snapshots that could not be
opened. The archive streams: a worker thread writes the tar (compressed or
not) into the object store's multipart upload as it goes, so neither memory
nor the scratch disk holds the whole archive, and its sha256 is computed on
the way. Uploads never overwrite (a fresh key with a nonce, put-if-absent),
and old snapshots are deleted only after a commit made them unreferenced.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio

from deltalog import __version__
from deltalog.errors import Conflict
from deltalog.keys import LogKeys
from deltalog.snapshot.archive import DEFAULT_ZSTD_LEVEL, Sidecar, write_archive
from deltalog.storage.store import ObjectInfo, ObjectStore
from deltalog.storage.transfer import Transferred, upload_from_thread

__all__ = [
    "DEFAULT_COMPRESSION",
    "Published",
    "forget_snapshot",
    "list_snapshots",
    "prune_snapshots",
    "publish_snapshot",
]

log = logging.getLogger("compactor.publish")

Compression = Literal["none", "zstd"]
DEFAULT_COMPRESSION: Compression = "zstd"
"""zstd (at ``DEFAULT_ZSTD_LEVEL``): 55 % of the bytes, faster end to end than none even on
loopback (README "Performance", the compression table)."""


@dataclass(frozen=True, slots=True)
class Published:
    key: str
    sha256: str
    size: int
    counts: dict[str, int]


def _chroma_version() -> str:
    import chromadb

    return str(getattr(chromadb, "__version__", ""))


async def publish_snapshot(
    store: ObjectStore,
    keys: LogKeys,
    directory: Path,
    *,
    hwm: int,
    token: int,
    counts: dict[str, int],
    compression: Compression = DEFAULT_COMPRESSION,
    level: int = DEFAULT_ZSTD_LEVEL,
    scratch: Path | None = None,
) -> Published:
    """Archive ``directory`` (a closed Chroma directory) into a new key as it is written.

    ``scratch`` (the snapshot cache's, so on the same disk and swept after a
    crash; else the system's temporary directory) is used only to read the
    key back when its creation was refused (see ``_holds``).
    """
    sidecar = Sidecar(
        format=1,
        log=keys.log,
        hwm=hwm,
        token=token,
        created_at=time.time(),
        counts=counts,
        files={},
        deltalog_version=__version__,
        chroma_version=_chroma_version(),
        identity=keys.identity if keys.bucket else "",
    )
    suffix = ".tar.zst" if compression == "zstd" else ".tar"
    key = keys.snapshot(hwm, token, uuid.uuid4().hex[:12], suffix)
    done: Transferred | None = None
    try:
        async with store.upload(key) as upload:
            await upload_from_thread(
                upload,
                lambda writer: write_archive(
                    directory, sidecar, writer, compression=compression, level=level
                ),
            )
            with anyio.CancelScope(shield=True):  # once created, we know it (see below)
                done = await upload.complete()
    except BaseException:
        if done is not None and done.created:  # cancelled after creating it: no commit has it
            await forget_snapshot(store, key)
        raise
    assert done is not None  # the block above completed the upload or raised
    if not done.created and not await _holds(store, done, scratch):
        raise Conflict(f"snapshot key {key} already exists", key=key)
    return Published(key, done.sha256, done.size, counts)


async def forget_snapshot(store: ObjectStore, key: str) -> None:
    """Delete an upload no commit references (best effort, shielded; retention is the backstop)."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(10):
        try:
            await store.delete(key)
        except Exception as exc:
            log.warning("could not delete unreferenced snapshot %s: %s", key, exc)


async def _holds(store: ObjectStore, ours: Transferred, scratch: Path | None) -> bool:
    """Whether the key our creation was refused at holds our archive already.

    It does when an upload's answer was lost and botocore's retry met the
    first attempt's object (412): the key's nonce is fresh, so nobody else
    wrote it.
    """
    with tempfile.TemporaryDirectory(prefix=f"publish-{os.getpid()}-", dir=scratch) as tmp:
        existing = await store.download_file(ours.key, Path(tmp) / "existing")
    return existing is not None and existing.sha256 == ours.sha256


async def list_snapshots(store: ObjectStore, keys: LogKeys) -> AsyncIterator[ObjectInfo]:
    """This log's snapshot objects, in hwm order; every other key under the prefix is skipped.

    The prefix can hold other logs' keys (see ``LogKeys.snapshot_hwm``).
    Ours start with 20 digits, which sort before any letter: the listing
    stops at the first key past the digits (another log's ``entries/``,
    say) instead of paging through that log.
    """
    prefix = len(keys.snapshots_prefix)
    async for info in store.list_after(keys.snapshots_prefix):
        if info.key[prefix : prefix + 1] > "9":
            return
        if keys.snapshot_hwm(info.key) is not None:
            yield info


async def prune_snapshots(
    store: ObjectStore,
    keys: LogKeys,
    *,
    keep: int,
    committed: str | None,
    below: int | None = None,
    recent: Sequence[str] = (),
    orphan_grace: float = 3600.0,
    now: float | None = None,
) -> list[str]:
    """Delete the snapshots retention no longer needs; return their keys.

    ``recent`` is the state item's history of committed keys, newest first:
    its first ``keep`` stay, older committed ones go. A snapshot no commit
    referenced (an **orphan**: the upload of a crashed or fenced run, or of
    a rebuild that was not published) goes once it is ``orphan_grace``
    seconds old, and never counts toward ``keep``. Without a history (a
    state committed by an older version) the newest ``keep`` by hwm stay.

    Whatever the rest says, ``committed`` stays, and with ``below`` (the
    committed hwm, read just before) so does every snapshot at or above it:
    the committed one or an upload that a newer owner may be about to
    commit, whatever this caller believes.
    """
    listed = [info async for info in list_snapshots(store, keys)]
    if recent:
        kept = set(recent[:keep])
        known = set(recent)
        cutoff = (time.time() if now is None else now) - orphan_grace
        candidates = [
            info.key
            for info in listed
            if info.key not in kept and (info.key in known or info.last_modified <= cutoff)
        ]
    else:
        ordered = sorted(
            (info.key for info in listed), key=lambda k: (keys.snapshot_hwm(k) or 0, k)
        )
        candidates = ordered[: max(0, len(ordered) - keep)]
    doomed = [
        k
        for k in candidates
        if k != committed and (below is None or (keys.snapshot_hwm(k) or 0) < below)
    ]
    for key in doomed:
        await store.delete(key)
    if doomed:
        log.info("deleted %d old snapshots of %s", len(doomed), keys.log)
    return doomed
