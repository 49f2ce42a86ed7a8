"""Corpus manifests: a small YAML file naming a WebDataset corpus, its fields and its splits.

```yaml
name: synthetic-shapes
description: free text
world: {name: synthetic-shapes, version: 3}   # optional: a generated corpus's world (see pipeline/corpus/synthetic.py)
fields:
  image: [png, jpg, jpeg, webp]        # extensions tried in order; the first one present is the image
  captions: {source: txt}              # txt: one caption a line (blank lines ignored)
                                       # or {source: json, field: caption}: a string or a list of strings
splits:
  train: {shards: "train-{000000..000019}.tar", num_samples: 20000}   # num_samples optional
  test:  {shards: ["a.tar", "pipe:curl -s https://host/b.tar"]}        # brace pattern or list
classification:                        # optional: zero-shot tasks in CLIP_benchmark's WebDataset layout
  cifar10: {root: wds_cifar10}         # root/classnames.txt, root/zeroshot_classification_templates.txt,
                                       # root/test/*.tar with {key}.<image ext> + {key}.cls (class index)
  mine: {shards: "x-{0..3}.tar", classnames: names.txt, templates: templates.txt}   # or each named
```

Shard patterns are brace-expanded (webdataset's notation, `{000..009}`, `{a,b}`). Relative local paths
resolve against the manifest's own directory; absolute paths, URLs (`http://`, `s3://`, ...) and
`pipe:` commands are kept as written. Every local shard must exist when the manifest is loaded.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Optional

import braceexpand
import yaml

from pipeline.common.atomic import atomic_write_text
from pipeline.common.config import ConfigError, from_dict, opt, Section
from pipeline.common.errors import PipelineError


class ManifestError(PipelineError):
    """A manifest that is missing, malformed or names shards that do not exist; the message names the file."""


# CLIP_benchmark's file names inside a task's root
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DEFAULT_JSON_CAPTION_FIELD = "caption"
CaptionSource = StrEnum("CaptionSource", {"txt": "txt", "json": "json"})
# A scheme of two or more letters followed by "://" (a single letter would be a Windows drive).
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")
_EXTENSION_RE = re.compile(r"^[a-z0-9][a-z0-9._\-]*$")
MAX_MISSING_LISTED = 10


# The manifest file's schema, typed and checked as params.yaml's sections are (pipeline/common/config.py):
# unknown keys, wrong types, modes and ranges are refused in one line naming the key. A shorthand (a string
# where a list or a mapping goes) is widened first; what needs the file system or several keys is checked below.

@dataclass
class CaptionsEntry(Section):
    source: CaptionSource = opt(CaptionSource.txt, "txt: one caption a line (blank lines ignored); json: a string "
                                "or a list of strings under `field`")
    field: Optional[str] = opt(None, f"source json: the key (dotted path allowed); default {DEFAULT_JSON_CAPTION_FIELD!r}")


@dataclass
class FieldsEntry(Section):
    image: list[str] = opt(doc="extensions tried in order; the first one present is the image",
                           factory=lambda: ["jpg", "jpeg", "png", "webp"])
    captions: CaptionsEntry = opt(doc="where a sample's captions come from", factory=CaptionsEntry)


@dataclass
class SplitEntry(Section):
    shards: list[str] = opt(doc="brace patterns, local paths, URLs or pipe: commands", factory=list)
    num_samples: Optional[int] = opt(None, "samples in the split (progress and plans)", at_least=0)


@dataclass
class TaskEntry(Section):
    root: str = opt("", "a CLIP_benchmark task folder: classnames, templates and <split>/*.tar inside")
    split: str = opt("test", "the split folder under root")
    shards: list[str] = opt(doc="or the labelled shards, each named", factory=list)
    classnames: str = opt("", f"one class name a line (default root/{CLASSNAMES_FILE})")
    templates: str = opt("", f"prompt templates with {{c}} (default root/{TEMPLATES_FILE})")
    num_samples: Optional[int] = opt(None, "labelled images in the task", at_least=0)


@dataclass
class ManifestFile(Section):
    name: Optional[str] = opt(None, "the corpus's name (default: the file's name)")
    description: Optional[str] = opt(None, "free text")
    world: Optional[dict[str, Any]] = opt(None, "a generated corpus's world: name, version, ...")
    fields: Optional[dict[str, Any]] = opt(None, "FieldsEntry")
    splits: Optional[dict[str, Any]] = opt(None, "split name -> SplitEntry")
    classification: Optional[dict[str, Any]] = opt(None, "task name -> TaskEntry")


@dataclass
class FieldMapping:
    """Which tar members make a sample: the image (first extension present) and its captions."""

    image_extensions: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    caption_source: str = "txt"  # txt | json
    caption_field: str = ""  # json only: key (dotted path allowed) holding a string or a list of strings


@dataclass
class SplitSpec:
    name: str
    pattern: str | list[str]  # as written in the manifest
    shards: list[str]  # expanded and resolved: local absolute paths, URLs or pipe: commands
    num_samples: int | None = None


@dataclass
class TaskSpec:
    """A zero-shot classification task: labelled image shards, class names and prompt templates."""

    name: str
    shards: list[str]
    classnames: list[str]
    templates: list[str]  # each with "{c}" where the class name goes
    num_samples: int | None = None


@dataclass
class Manifest:
    name: str
    description: str
    path: Path
    fields: FieldMapping
    splits: dict[str, SplitSpec]
    sha256: str  # of the manifest file's bytes: recorded in every output derived from it
    classification: dict[str, TaskSpec] = field(default_factory=dict)
    world: dict | None = None  # a generated corpus's world (name, version, ...); a teacher pretrained on one checks it

    def split(self, name: str) -> SplitSpec:
        if name not in self.splits:
            raise ManifestError(
                f"{self.path}: no split {name!r}; available splits: {', '.join(sorted(self.splits))}"
            )
        return self.splits[name]


def is_remote(shard: str) -> bool:
    """True for `pipe:` commands and URLs, which are opened as written and never checked for existence."""
    return shard.startswith("pipe:") or bool(_URL_RE.match(shard))


def resolve_shard(shard: str, base_dir: Path) -> str:
    """A local path relative to `base_dir` becomes absolute; URLs, `pipe:` and absolute paths are kept."""
    if is_remote(shard):
        return shard
    if shard.startswith("file:"):
        shard = re.sub(r"^file:(//)?", "", shard)
    path = Path(shard).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    # normpath collapses "a/../b" without touching the file system (unlike resolve(), keeps symlinks)
    return os.path.normpath(str(path))


def expand_pattern(pattern: str) -> list[str]:
    """Brace-expand one shard pattern: `"a-{00..02}.tar"` -> `["a-00.tar", "a-01.tar", "a-02.tar"]`."""
    return list(braceexpand.braceexpand(pattern))


def _fail(path: Path, message: str) -> ManifestError:
    return ManifestError(f"{path}: {message}")


def _typed(path: Path, cls: type, data: Any, where: str, example: str) -> Any:
    """`data` (a mapping) as the typed entry `cls`, or a ManifestError naming the file and the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _fail(path, f"{where or 'the top level'} must be a mapping like {example}, got {data!r}")
    try:
        return from_dict(cls, data, where)
    except ConfigError as exc:
        raise _fail(path, str(exc)) from None


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _parse_fields(path: Path, data: Any) -> FieldMapping:
    if isinstance(data, dict):  # shorthands: image: png, captions: txt
        data = {**data, **({"image": _as_list(data["image"])} if "image" in data else {}),
                **({"captions": {"source": data["captions"]}} if isinstance(data.get("captions"), str) else {})}
    entry = _typed(path, FieldsEntry, data, "fields", "{image: [jpg], captions: {source: txt}}")
    cleaned = [ext.lower().lstrip(".") if isinstance(ext, str) else "" for ext in entry.image]
    if not cleaned:
        raise _fail(path, "fields.image must be a non-empty list of extensions")
    bad = [ext for ext, clean in zip(entry.image, cleaned) if not _EXTENSION_RE.match(clean)]
    if bad:
        raise _fail(path, f"fields.image: {bad[0]!r} is not a file extension (e.g. jpg, png, webp)")
    if len(set(cleaned)) != len(cleaned):
        raise _fail(path, f"fields.image lists an extension twice: {entry.image!r}")
    source, caption_field = entry.captions.source, entry.captions.field
    if source == "txt" and caption_field is not None:
        raise _fail(path, "fields.captions.field only applies to source: json")
    if source == "json" and caption_field == "":
        raise _fail(path, "fields.captions.field must be a non-empty string")
    if source == "json" and caption_field is None:
        caption_field = DEFAULT_JSON_CAPTION_FIELD
    return FieldMapping(cleaned, source, caption_field or "")


def _expand_shards(path: Path, where: str, patterns: list[str]) -> list[str]:
    """Brace-expanded, resolved against the manifest's folder, each once."""
    if not patterns:
        raise _fail(path, f"{where}.shards must be a string or a non-empty list of strings")
    expanded: list[str] = []
    for p in patterns:
        if not p.strip():
            raise _fail(path, f"{where}.shards contains an empty entry")
        try:
            expanded.extend(expand_pattern(p))
        except Exception as exc:  # braceexpand.UnbalancedBracesError and friends
            raise _fail(path, f"{where}.shards: cannot expand {p!r}: {exc}") from None
    base_dir = Path(os.path.abspath(path)).parent
    shards = [resolve_shard(s, base_dir) for s in expanded]
    duplicates = sorted({s for s in shards if shards.count(s) > 1})
    if duplicates:
        raise _fail(path, f"{where}.shards lists a shard twice: {duplicates[:MAX_MISSING_LISTED]}")
    return shards


def _parse_split(path: Path, name: str, data: Any) -> SplitSpec:
    where = f"splits.{name}"
    pattern = data.get("shards") if isinstance(data, dict) else None
    widened = {**data, "shards": _as_list(pattern)} if isinstance(data, dict) and pattern is not None else data
    entry = _typed(path, SplitEntry, widened, where, '{shards: "train-{000..009}.tar"}')
    if pattern is None:
        raise _fail(path, f"{where} has no 'shards'")
    return SplitSpec(name=name, pattern=pattern, shards=_expand_shards(path, where, entry.shards),
                     num_samples=entry.num_samples)


def _read_lines(path: Path, file: Path, where: str) -> list[str]:
    if not file.is_file():
        raise _fail(path, f"{where}: {file} not found")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise _fail(path, f"{where}: {file} is empty")
    return lines


def _parse_task(path: Path, name: str, data: Any) -> TaskSpec:
    where = f"classification.{name}"
    widened = {**data, "shards": _as_list(data["shards"])} if isinstance(data, dict) and "shards" in data else data
    entry = _typed(path, TaskEntry, widened, where, "{root: wds_cifar10}")
    if not entry.root and not (entry.shards and entry.classnames and entry.templates):
        raise _fail(path, f"{where} needs 'root' (CLIP_benchmark layout) or all of shards, classnames, templates")
    base_dir = Path(os.path.abspath(path)).parent
    patterns = entry.shards or [f"{entry.root}/{entry.split}/*.tar"]
    if len(patterns) == 1 and "*" in patterns[0]:  # CLIP_benchmark names shards 0.tar, 1.tar, ...
        pattern = Path(resolve_shard(patterns[0], base_dir))
        found = sorted(pattern.parent.glob(pattern.name), key=lambda p: (len(p.name), p.name))
        if not found:
            raise _fail(path, f"{where}: no shards match {pattern}")
        patterns = [str(p) for p in found]
    shards = _expand_shards(path, where, patterns)

    def lines_of(file: str, default_name: str) -> list[str]:
        return _read_lines(path, Path(resolve_shard(file or f"{entry.root}/{default_name}", base_dir)), where)

    classnames, templates = lines_of(entry.classnames, CLASSNAMES_FILE), lines_of(entry.templates, TEMPLATES_FILE)
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise _fail(path, f"{where}: templates without '{{c}}' (where the class name goes): {bad[:3]}")
    return TaskSpec(name=name, shards=shards, classnames=classnames, templates=templates, num_samples=entry.num_samples)


def load_manifest(path: str | Path) -> Manifest:
    """Parse and validate a manifest; every problem is a ManifestError naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    raw = path.read_bytes()
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise _fail(path, f"not valid YAML: {exc}") from None
    top = _typed(path, ManifestFile, data, "", "{name: ..., splits: {train: {shards: ...}}}")
    name = path.stem if top.name is None else top.name
    if not name:
        raise _fail(path, "name must be a non-empty string")
    world = top.world
    if world is not None and not (isinstance(world.get("name"), str) and "version" in world):
        raise _fail(path, f"world must be a mapping with a name and a version, got {world!r}")
    fields = _parse_fields(path, top.fields)
    if not top.splits:
        raise _fail(path, "no splits: add a 'splits' mapping, e.g. splits: {train: {shards: \"train-{000..009}.tar\"}}")
    splits = {str(k): _parse_split(path, str(k), v) for k, v in top.splits.items()}
    tasks = {str(k): _parse_task(path, str(k), v) for k, v in (top.classification or {}).items()}

    all_shards = [s for spec in [*splits.values(), *tasks.values()] for s in spec.shards]
    missing = [s for s in all_shards if not is_remote(s) and not Path(s).is_file()]
    if missing:
        listed = ", ".join(missing[:MAX_MISSING_LISTED])
        more = f" (and {len(missing) - MAX_MISSING_LISTED} more)" if len(missing) > MAX_MISSING_LISTED else ""
        raise _fail(path, f"{len(missing)} local shard(s) do not exist: {listed}{more}")

    return Manifest(
        name=name,
        description=top.description or "",
        path=path.resolve(),
        fields=fields,
        splits=splits,
        sha256=hashlib.sha256(raw).hexdigest(),
        classification=tasks,
        world=world,
    )


def dump_manifest(data: dict, comment: str = "") -> str:
    """The YAML text of a manifest: block style at the top, one flow mapping per split, key order kept."""
    lines = [f"# {line}".rstrip() for line in comment.splitlines()] if comment else []
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120, allow_unicode=True)
    return "\n".join(lines + [body.rstrip("\n")]) + "\n"


def write_manifest(data: dict, path: str | Path, comment: str = "") -> Path:
    """Write a manifest atomically (temp file then rename); `comment` becomes leading `#` lines."""
    return atomic_write_text(dump_manifest(data, comment), path)
