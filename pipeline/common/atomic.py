"""Atomic file writes and the output-folder checks every stage makes before work.

Every output of the pipeline is written to a temporary file beside its final path and renamed, so a
killed stage never leaves a half-written file that a re-run would trust; a failed write (full disk,
read-only folder, size limit) is an OutputError naming the path.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common.errors import PipelineError

log = logging.getLogger(__name__)


class OutputError(PipelineError):
    """An output that cannot be written (full disk, read-only folder, file size limit); names the path."""


# Temporaries are named `.<name>.tmp-<host>-<pid>`: a run removes those of dead processes on its own
# host when it starts (`prepare_output_dir`); another host's (shared file system) are left alone.
_HOST = socket.gethostname().replace("-", "_")


_TMP_NAME = re.compile(r"^\..+\.tmp-(?:(?P<host>[^-]+)-)?(?P<pid>\d+)$")


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}")


def atomic_write_with(path: str | Path, write: Callable[[Path], None], errors: tuple = (OSError,)) -> Path:
    """`write(tmp)` beside `path`, then rename: a killed or failed write never leaves `path` half-written.
    A failure of the file system (full disk, read-only, size limit) is an OutputError naming `path`."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except errors as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"the write failed ({str(exc).splitlines()[0]})"
        raise OutputError(f"cannot write {path}: {reason}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def atomic_write_table(table: pa.Table, path: str | Path, compression: str = "zstd") -> Path:
    return atomic_write_with(path, lambda tmp: pq.write_table(table, tmp, compression=compression))


def atomic_write_bytes(data: bytes, path: str | Path) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write_with(path, write)


def atomic_write_text(text: str, path: str | Path) -> Path:
    return atomic_write_bytes(text.encode(), path)


def atomic_write_json(obj: Any, path: str | Path) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    import torch  # only the stages that save weights pay for the import here

    # torch's zip writer reports a failed write (full disk, size limit) as a RuntimeError
    return atomic_write_with(path, lambda tmp: torch.save(obj, tmp), errors=(OSError, RuntimeError))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries that killed runs on this host left under `folder` (recursively)."""
    removed = []
    for path in Path(folder).rglob(".*.tmp-*"):
        match = _TMP_NAME.match(path.name)
        if not match or not path.is_file() or match["host"] not in (None, _HOST):
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and not _process_alive(pid):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) left by killed runs in %s", len(removed), folder)
    return removed


def prepare_output_dir(folder: str | Path, need_bytes: int = 0) -> Path:
    """Before any work: `folder` exists and is writable, has about `need_bytes` free, and holds no
    temporaries of dead runs (a killed run's partial checkpoint could keep a full disk full)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output folder {folder} is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise OutputError(f"output folder {folder} is not writable: {exc.strerror or exc}") from None
    remove_stale_temporaries(folder)
    check_free_space(folder, need_bytes)
    return folder


def check_free_space(folder: str | Path, need_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise OutputError(
            f"output folder {folder} has {free / 2**20:.0f} MiB free, this run needs about {need_bytes / 2**20:.0f} MiB"
        )


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def staging_dir(final: str | Path) -> Path:
    """Where a folder that must appear whole is written first: `.<name>.partial` beside it."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial")


def publish_dir(staging: str | Path, final: str | Path) -> Path:
    """Put the finished `staging` folder in place of `final`. At every instant `final` is the old complete
    folder, absent, or the new complete one; never half written (a killed run leaves only the staging folder,
    which the next run removes)."""
    staging, final = Path(staging), Path(final)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
