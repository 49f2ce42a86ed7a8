"""One writer per output folder: a lock file beside the folder, taken atomically, naming its holder.

`<folder>.lock` (a sibling, so it never becomes part of a DVC output) is created by hard-linking a file that already
holds its holder, which is atomic and exclusive on local file systems and on NFS (where `flock` may not reach across
machines), and leaves no instant in which the lock exists empty. It holds the host, pid,
start time and command of the run. A second run refuses at once, in one line naming the holder. A lock whose
holder is dead on this host (a `kill -9`) is taken over with a warning; one from another host only with
`--break-lock`, since its process cannot be checked from here. Under torchrun only rank 0 takes it, for all ranks.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

from pipeline.common.atomic import _process_alive
from pipeline.common.errors import PipelineError

log = logging.getLogger(__name__)
LOCK_SUFFIX = ".lock"


class LockError(PipelineError):
    """Another run holds the output folder."""


def lock_path(folder: str | Path) -> Path:
    folder = Path(folder).absolute()
    return folder.with_name(folder.name + LOCK_SUFFIX)


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])[:300]}


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} ({holder.get('command')})"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # being written this instant, or damaged: treated as a holder we cannot check


def _try_create(path: Path, holder: dict) -> bool:
    """Create the lock already holding its holder: written to a file of our own, then hard-linked into place
    (atomic, and failing if the lock exists, as O_EXCL), so that no other run ever reads an empty lock."""
    own = path.with_name(f"{path.name}.{holder['host']}.{holder['pid']}.tmp")
    try:
        own.write_text(json.dumps(holder))  # inside the try: a full disk leaves no half-written holder file
        os.link(own, path)
    except FileExistsError:
        return False
    finally:
        own.unlink(missing_ok=True)
    return True


def acquire(folder: str | Path, break_lock: bool = False) -> Path:
    """Take the lock of `folder` or raise LockError naming its holder."""
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = _holder()
    for _ in range(3):  # a takeover races other takers: whoever creates the file first wins
        if _try_create(path, me):
            return path
        held = _read(path)
        here = held.get("host") == me["host"] and isinstance(held.get("pid"), int)
        dead = here and not _process_alive(held["pid"])
        if dead or break_lock:
            log.warning("%s: taking over the lock of %s (%s)", folder, _describe(held),
                        "its process is gone" if dead else "--break-lock")
            path.unlink(missing_ok=True)
            continue
        hint = "wait for it to finish" if here else "if that run is gone, pass --break-lock"
        raise LockError(f"{folder} is being written by {_describe(held)}: {hint}")
    raise LockError(f"{folder}: could not take the lock at {path} (other runs keep taking it)")


def release(path: Path) -> None:
    """Remove the lock if it is still this process's (a --break-lock may have handed it to another run)."""
    holder = _read(path)
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(*folders: str | Path, break_lock: bool = False) -> Iterator[None]:
    """Hold the locks of `folders` (empty ones skipped) for the duration; only rank 0 under torchrun."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    taken: list[Path] = []
    try:
        for folder in dict.fromkeys(str(f) for f in folders if f):
            taken.append(acquire(folder, break_lock))
        yield
    finally:
        for path in reversed(taken):
            release(path)
