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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio

from deltalog import __version__
from deltalog.errors import Conflict
from deltalog.keys import LogKeys
from deltalog.snapshot.archive import DEFAULT_ZSTD_LEVEL, Sidecar, write_archive
from deltalog.storage.store import ObjectInfo, ObjectStore
from deltalog.storage.table import LogState
from deltalog.storage.transfer import Transferred, upload_from_thread

__all__ = [
    "DEFAULT_COMPRESSION",
    "Published",
    "Retention",
    "forget_snapshot",
    "list_snapshots",
    "plan_retention",
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


async def list_snapshots(
    store: ObjectStore, keys: LogKeys, *, markers: bool = False
) -> AsyncIterator[ObjectInfo]:
    """This log's snapshot objects, in hwm order; every other key under the prefix is skipped.

    With ``markers``, retention's ``seen`` markers too (each right after its
    snapshot). The prefix can hold other logs' keys (see
    ``LogKeys.snapshot_hwm``). Ours start with 20 digits, which sort before
    any letter: the listing stops at the first key past the digits (another
    log's ``entries/``, say) instead of paging through that log.
    """
    prefix = len(keys.snapshots_prefix)
    async for info in store.list_after(keys.snapshots_prefix):
        if info.key[prefix : prefix + 1] > "9":
            return
        if keys.snapshot_hwm(info.key) is not None or (markers and keys.seen_of(info.key)):
            yield info


@dataclass(frozen=True, slots=True)
class Retention:
    """What one retention pass does: a pure function of a listing and the state read after it."""

    delete: list[str]
    """Snapshots to delete: committed ones past ``keep``, and orphans old enough."""
    mark: list[str]
    """Orphans listed for the first time: their age counts from the marker written now."""
    unmark: list[str]
    """Markers whose snapshot is deleted or gone."""


def plan_retention(
    listed: Sequence[ObjectInfo],
    state: LogState,
    keys: LogKeys,
    *,
    keep: int,
    orphan_grace: float,
    now: float,
) -> Retention:
    """Which snapshots and markers go; see ``prune_snapshots``.

    ``listed`` is what ``list_snapshots(markers=True)`` gave; ``state`` was
    read after that listing; ``now`` is on the store's clock.
    """
    seen: dict[str, float] = {}
    for info in listed:
        if (of := keys.seen_of(info.key)) is not None:
            seen[of] = info.last_modified
    snapshots = [i.key for i in listed if keys.snapshot_hwm(i.key) is not None]
    recent = state.recent_snapshots
    if recent:
        kept = {state.snapshot_key, *recent[:keep]}
    else:  # a state committed by an older version: no history, keep the newest by hwm
        by_hwm = sorted(snapshots, key=lambda k: (keys.snapshot_hwm(k) or 0, k))
        kept = {state.snapshot_key, *by_hwm[max(0, len(by_hwm) - keep) :]}
    delete: list[str] = []
    mark: list[str] = []
    for key in snapshots:
        if key in kept:
            continue
        if key in recent:  # committed once, superseded since: it is never committed again
            delete.append(key)
        elif (keys.snapshot_token(key) or 0) >= state.token:
            continue  # its uploader may hold the lease still and commit it
        elif not recent or orphan_grace <= 0 or now - seen.get(key, now) >= orphan_grace:
            delete.append(key)
        elif key not in seen:
            mark.append(key)
    gone = set(delete) | (seen.keys() - set(snapshots))
    return Retention(delete, mark, sorted(keys.seen(k) for k in gone if k in seen))


async def prune_snapshots(
    store: ObjectStore,
    keys: LogKeys,
    read_state: Callable[[], Awaitable[LogState]],
    *,
    keep: int,
    orphan_grace: float = 3600.0,
    now: float | None = None,
) -> list[str]:
    """Delete the snapshots retention no longer needs; return their keys.

    The state item's ``recent_snapshots`` is the history of committed keys,
    newest first: its first ``keep`` stay, older committed ones go. A
    snapshot no commit referenced (an **orphan**: the upload of a crashed or
    fenced run, or of a rebuild that was not published) never counts toward
    ``keep``; it goes once ``orphan_grace`` seconds have passed since
    retention first listed it (a ``seen`` marker, written then, dates it:
    S3 dates a multipart upload from its start, so its own ``LastModified``
    can be older than the grace the moment it appears). Without a history (a
    state committed by an older version) the newest ``keep`` by hwm stay.

    Whatever the rest says, nothing goes that the state could point to after
    this pass read it (it needs no lease, and its caller may pause anywhere):

    - the state is read (``read_state``) **after** the listing, so every
      listed key that was committed by then is in what it read;
    - an orphan whose token is at or above the state's is kept: its
      uploader may hold the lease and commit it (a forced rebuild's
      rollback included, whatever its hwm); one below can never be
      committed, since the state's token only grows and a commit needs its
      own;
    - a superseded commit is never committed again.

    ``now`` (the store's clock) is read from the store when a marker's age
    is needed.
    """
    listed = [info async for info in list_snapshots(store, keys, markers=True)]
    state = await read_state()
    if now is None and orphan_grace > 0 and any(keys.seen_of(i.key) for i in listed):
        now = await store.clock(keys.snapshots_prefix)
    plan = plan_retention(listed, state, keys, keep=keep, orphan_grace=orphan_grace, now=now or 0.0)
    for key in plan.mark:
        await store.put_if_absent(keys.seen(key), b"")
    for key in [*plan.delete, *plan.unmark]:
        await store.delete(key)
    if plan.delete:
        log.info("deleted %d old snapshots of %s", len(plan.delete), keys.log)
    return plan.delete
