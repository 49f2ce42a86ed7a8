"""Reading WebDataset shards into samples that carry ALL their captions; every skip is counted.

A shard is a tar file whose members are grouped into samples by key (webdataset's rule: the key is
the member name up to the first dot of its base name, `dir/0001.jpg` -> key `dir/0001`, extension
`jpg`). Only raw bytes are read; nothing is unpickled or decoded here. Image decoding happens in
the consumer (`pipeline.augment.decode_image`), which counts failures as `CORRUPT_IMAGE` in the same
`SkipReport`.
"""
from __future__ import annotations

import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from pipeline.corpus.manifest import FieldMapping

# ---- skip reasons ------------------------------------------------------------------------------
CORRUPT_IMAGE = "corrupt_image"  # image bytes PIL cannot decode (counted by the consumer)
MISSING_IMAGE = "missing_image"  # no member with any of the manifest's image extensions
MISSING_CAPTION = "missing_caption"  # no .txt / .json member, or the json lacks the caption field
EMPTY_CAPTION = "empty_caption"  # the caption member holds no non-blank caption
BAD_CAPTION_JSON = "bad_caption_json"  # .json that does not parse, or a caption value of the wrong type
BAD_CAPTION_TEXT = "bad_caption_text"  # .txt that is not UTF-8
DUPLICATE_KEY = "duplicate_key"  # a key seen earlier in the same shard (members not grouped by key)
MISSING_LABEL = "missing_label"  # classification: no .cls member
BAD_LABEL = "bad_label"  # classification: a .cls that is not a class index of the task
UNREADABLE_SHARD = "unreadable_shard"  # missing, truncated or corrupt tar, failed pipe/URL: rest of shard lost

MAX_EXAMPLES = 5


@dataclass
class Sample:
    key: str
    shard: str
    image_bytes: bytes  # encoded exactly as stored in the shard
    image_format: str  # the member's extension, e.g. jpg, png, webp
    captions: list[str]  # every non-blank caption of the sample, in stored order
    # where the image member's data lies in the shard file (uncompressed local tars only, else None):
    # what `extract.store_images: false` references instead of copying the bytes
    image_offset: int | None = None
    image_size: int | None = None


@dataclass
class SkipReport:
    """Counts of skipped samples by reason, with the first few offending `(shard, key)` pairs.

    For `unreadable_shard` the key is the last key read before the failure ("" if none) and the
    count is of shards, not samples: how many samples a broken shard still held is unknown.
    """

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def add(self, reason: str, shard: str, key: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < MAX_EXAMPLES:
            kept.append((shard, key))

    def merge(self, other: "SkipReport") -> "SkipReport":
        """Add `other`'s counts and (up to the limit) its examples into this report; returns self."""
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
            kept = self.examples.setdefault(reason, [])
            for example in other.examples.get(reason, []):
                if len(kept) >= MAX_EXAMPLES:
                    break
                kept.append(tuple(example))
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: `{"total": n, "counts": {reason: n}, "examples": {reason: [[shard, key], ...]}}`."""
        return {
            "total": self.total,
            "counts": dict(sorted(self.counts.items())),
            "examples": {r: [list(e) for e in self.examples.get(r, [])] for r in sorted(self.counts)},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SkipReport":
        """Inverse of `to_dict` (e.g. to merge the reports of resumed work units)."""
        report = cls()
        for reason, count in data.get("counts", {}).items():
            report.counts[reason] = int(count)
            report.examples[reason] = [tuple(e) for e in data.get("examples", {}).get(reason, [])][:MAX_EXAMPLES]
        return report

    def summary(self) -> str:
        if not self.total:
            return "no samples skipped"
        lines = [f"{self.total} skipped:"]
        for reason in sorted(self.counts):
            examples = ", ".join(f"{shard} [{key or '-'}]" for shard, key in self.examples.get(reason, []))
            more = "" if self.counts[reason] <= len(self.examples.get(reason, [])) else ", ..."
            lines.append(f"  {reason}: {self.counts[reason]} (e.g. {examples}{more})")
        return "\n".join(lines)

    def log(self, logger: logging.Logger) -> None:
        if self.total:
            logger.warning("%s", self.summary())
        else:
            logger.info("%s", self.summary())


def _decode_captions(
    members: dict[str, bytes], fields: FieldMapping, report: SkipReport, shard: str, key: str
) -> list[str] | None:
    """The sample's captions, or None after counting why there are none."""
    if fields.caption_source == "txt":
        data = members.get("txt")
        if data is None:
            report.add(MISSING_CAPTION, shard, key)
            return None
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            report.add(BAD_CAPTION_TEXT, shard, key)
            return None
        captions = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        data = members.get("json")
        if data is None:
            report.add(MISSING_CAPTION, shard, key)
            return None
        try:
            value: Any = json.loads(data)
        except (UnicodeDecodeError, ValueError):
            report.add(BAD_CAPTION_JSON, shard, key)
            return None
        for part in fields.caption_field.split("."):
            if not isinstance(value, dict) or part not in value:
                report.add(MISSING_CAPTION, shard, key)
                return None
            value = value[part]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            report.add(BAD_CAPTION_JSON, shard, key)
            return None
        captions = [v.strip() for v in value if v.strip()]
    if not captions:
        report.add(EMPTY_CAPTION, shard, key)
        return None
    return captions


def _make_sample(
    key: str, members: dict[str, bytes], fields: FieldMapping, report: SkipReport, shard: str
) -> Sample | None:
    image_format = next((ext for ext in fields.image_extensions if ext in members), None)
    if image_format is None:
        report.add(MISSING_IMAGE, shard, key)
        return None
    captions = _decode_captions(members, fields, report, shard, key)
    if captions is None:
        return None
    offset = members.offsets.get(image_format) if isinstance(members, MemberBytes) else None
    return Sample(key=key, shard=shard, image_bytes=members[image_format], image_format=image_format, captions=captions,
                  image_offset=offset, image_size=len(members[image_format]) if offset is not None else None)


class MemberBytes(dict):
    """{extension: bytes} of one sample, with `offsets[extension]`: where each member's data starts in
    the shard file (filled for uncompressed local tars only, where it means a file position)."""

    def __init__(self) -> None:
        super().__init__()
        self.offsets: dict[str, int] = {}


def _tar_members(stream) -> Iterator[tuple[str, Callable[[], bytes], int]]:
    """(name, read, data offset) of each regular member of a tar stream, in order (works on pipes). `read()`
    must be called before advancing: a sample is known complete as soon as the next member's
    header names another key, before that member's data is read."""
    with tarfile.open(fileobj=stream, mode="r|*") as archive:
        for info in archive:
            if not info.isreg():
                continue

            def read(info: tarfile.TarInfo = info) -> bytes:
                handle = archive.extractfile(info)
                data = handle.read() if handle is not None else b""
                if len(data) != info.size:  # tarfile hands back short reads at a truncated end
                    raise tarfile.ReadError(f"member {info.name} truncated ({len(data)} of {info.size} bytes)")
                return data

            yield info.name, read, info.offset_data
            archive.members = []  # streaming: do not keep every TarInfo of a large shard
        # tarfile takes a clean end of data at a member boundary for the end of the archive; a whole
        # tar ends with a zero block, so a stream that stops before one was truncated.
        consumed = getattr(archive.fileobj, "pos", None)
        if consumed is not None and consumed < archive.offset + tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"no end-of-archive block after {archive.offset} bytes: truncated")


def iter_shard(url: str, fields: FieldMapping, report: SkipReport) -> Iterator[Sample]:
    """Samples of ONE shard (local path, `pipe:` command or URL), each with all its captions.

    Members are grouped by key as webdataset does (consecutive members with the same key make one
    sample; extensions are lower-cased). A sample without an image or a caption is skipped and
    counted. A shard that cannot be opened or read to the end is counted once as
    `unreadable_shard`; the samples completed before the failure are kept.
    """
    for key, members in iter_members(url, report):
        sample = _make_sample(key, members, fields, report, url)
        if sample is not None:
            yield sample


@dataclass
class LabelledSample:
    """An image of a zero-shot classification task (CLIP_benchmark layout: `{key}.cls`)."""

    key: str
    shard: str
    image_bytes: bytes
    image_format: str
    label: int


def iter_labelled(url: str, image_extensions: list[str], num_classes: int, report: SkipReport) -> Iterator[LabelledSample]:
    """The labelled images of ONE classification shard; a missing image or label, or a label that is
    not a class index below `num_classes`, is a counted skip."""
    for key, members in iter_members(url, report):
        image_format = next((ext for ext in image_extensions if ext in members), None)
        if image_format is None:
            report.add(MISSING_IMAGE, url, key)
            continue
        if "cls" not in members:
            report.add(MISSING_LABEL, url, key)
            continue
        try:
            label = int(members["cls"].decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError):
            label = -1
        if not 0 <= label < num_classes:
            report.add(BAD_LABEL, url, key)
            continue
        yield LabelledSample(key, url, members[image_format], image_format, label)


def iter_members(url: str, report: SkipReport) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of ONE shard, grouped by key as webdataset does; a
    repeated key is a counted skip, a shard that breaks is counted once as `unreadable_shard`."""
    log = logging.getLogger(__name__)
    seen: set[str] = set()
    current_key: str | None = None
    current = MemberBytes()
    last_key = ""
    # data offsets in the stream are file positions only for an uncompressed local tar
    positional = is_plain_local_tar(url)

    def finish() -> tuple[str, dict[str, bytes]] | None:
        nonlocal last_key
        if current_key is None:
            return None
        last_key = current_key
        if current_key in seen:
            report.add(DUPLICATE_KEY, url, current_key)
            return None
        seen.add(current_key)
        return current_key, current

    stream = None
    try:
        stream = gopen(url, "rb")
        for name, read, offset in _tar_members(stream):
            prefix, suffix = base_plus_ext(name)
            if prefix is None:
                continue  # a member without an extension belongs to no sample
            base = prefix.rsplit("/", 1)[-1]
            if base.startswith("__") and base.endswith("__"):
                continue  # webdataset metadata members (__key__ style)
            suffix = suffix.lower()
            if prefix != current_key:
                group = finish()
                if group is not None:
                    yield group
                current_key, current = prefix, MemberBytes()
            data = read()
            if suffix not in current:  # a repeated member name: keep the first copy
                current[suffix] = data
                if positional:
                    current.offsets[suffix] = offset
        group = finish()
        current_key = None
        if group is not None:
            yield group
        if stream is not None:
            _close(stream)  # a pipe's exit status is checked here
            stream = None
    except GeneratorExit:
        raise
    except Exception as exc:  # missing file, truncated or corrupt tar, failed pipe/URL, ...
        # The sample being read when the shard broke is incomplete: it is lost with the rest.
        report.add(UNREADABLE_SHARD, url, last_key)
        log.warning("unreadable shard %s (after key %r): %s", url, last_key or None, exc)
    finally:
        if stream is not None:
            try:
                _close(stream)
            except Exception:
                pass


def local_path(url: str) -> str | None:
    """The file of a local shard (`path` or `file:path`); None for `pipe:` commands and URLs."""
    if url.startswith("pipe:") or ("://" in url and not url.startswith("file://")):
        return None
    return url[len("file://"):] if url.startswith("file://") else url[len("file:"):] if url.startswith("file:") else url


def is_plain_local_tar(url: str) -> bool:
    """A local, uncompressed tar: the only kind whose members can be read back by byte offset."""
    path = local_path(url)
    if path is None or not os.path.isfile(path):
        return False
    with open(path, "rb") as handle:
        head = handle.read(tarfile.BLOCKSIZE)
    return len(head) == tarfile.BLOCKSIZE and head[257:262] == b"ustar"


def _close(stream) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        close()


def iter_samples(shards: Iterable[str], fields: FieldMapping, report: SkipReport) -> Iterator[Sample]:
    """`iter_shard` over each shard in order."""
    for url in shards:
        yield from iter_shard(url, fields, report)
