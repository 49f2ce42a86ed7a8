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
from pathlib import Path
from typing import Any

import braceexpand
import yaml

from pipeline.common.atomic import atomic_write_text
from pipeline.common.errors import PipelineError


class ManifestError(PipelineError):
    """A manifest that is missing, malformed or names shards that do not exist; the message names the file."""


TOP_LEVEL_KEYS = ("name", "description", "world", "fields", "splits", "classification")
TASK_KEYS = ("root", "split", "shards", "classnames", "templates", "num_samples")
# CLIP_benchmark's file names inside a task's root
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
FIELDS_KEYS = ("image", "captions")
CAPTION_KEYS = ("source", "field")
SPLIT_KEYS = ("shards", "num_samples")
CAPTION_SOURCES = ("txt", "json")
DEFAULT_JSON_CAPTION_FIELD = "caption"
# A scheme of two or more letters followed by "://" (a single letter would be a Windows drive).
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")
_EXTENSION_RE = re.compile(r"^[a-z0-9][a-z0-9._\-]*$")
MAX_MISSING_LISTED = 10


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


def _check_keys(path: Path, where: str, data: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(str(k) for k in set(data) - set(allowed))
    if unknown:
        raise _fail(path, f"unknown key(s) {unknown} in {where}; allowed: {list(allowed)}")


def _parse_fields(path: Path, data: Any) -> FieldMapping:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _fail(path, f"'fields' must be a mapping with keys {list(FIELDS_KEYS)}, got {data!r}")
    _check_keys(path, "'fields'", data, FIELDS_KEYS)
    mapping = FieldMapping()

    if "image" in data:
        extensions = data["image"]
        if isinstance(extensions, str):
            extensions = [extensions]
        if not isinstance(extensions, list) or not extensions:
            raise _fail(path, f"'fields.image' must be a non-empty list of extensions, got {data['image']!r}")
        cleaned = []
        for ext in extensions:
            if not isinstance(ext, str) or not _EXTENSION_RE.match(ext.lower().lstrip(".")):
                raise _fail(path, f"'fields.image': {ext!r} is not a file extension (e.g. jpg, png, webp)")
            cleaned.append(ext.lower().lstrip("."))
        if len(set(cleaned)) != len(cleaned):
            raise _fail(path, f"'fields.image' lists an extension twice: {extensions!r}")
        mapping.image_extensions = cleaned

    if "captions" in data:
        captions = data["captions"]
        if isinstance(captions, str):
            captions = {"source": captions}
        if not isinstance(captions, dict):
            raise _fail(path, f"'fields.captions' must be a mapping like {{source: txt}}, got {captions!r}")
        _check_keys(path, "'fields.captions'", captions, CAPTION_KEYS)
        source = captions.get("source", "txt")
        if source not in CAPTION_SOURCES:
            raise _fail(path, f"'fields.captions.source' must be one of {list(CAPTION_SOURCES)}, got {source!r}")
        caption_field = captions.get("field")
        if source == "txt":
            if caption_field is not None:
                raise _fail(path, "'fields.captions.field' only applies to source: json")
            caption_field = ""
        else:
            caption_field = DEFAULT_JSON_CAPTION_FIELD if caption_field is None else caption_field
            if not isinstance(caption_field, str) or not caption_field:
                raise _fail(path, f"'fields.captions.field' must be a non-empty string, got {caption_field!r}")
        mapping.caption_source = source
        mapping.caption_field = caption_field
    return mapping


def _parse_split(path: Path, name: str, data: Any, where: str = "") -> SplitSpec:
    where = where or f"'splits.{name}'"
    if not isinstance(data, dict):
        raise _fail(path, f"{where} must be a mapping like {{shards: \"train-{{000..009}}.tar\"}}, got {data!r}")
    _check_keys(path, where, data, SPLIT_KEYS)
    if "shards" not in data:
        raise _fail(path, f"{where} has no 'shards'")
    pattern = data["shards"]
    if isinstance(pattern, str):
        patterns = [pattern]
    elif isinstance(pattern, list) and pattern and all(isinstance(p, str) for p in pattern):
        patterns = pattern
    else:
        raise _fail(path, f"{where}.shards must be a string or a non-empty list of strings, got {pattern!r}")
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

    num_samples = data.get("num_samples")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0):
        raise _fail(path, f"{where}.num_samples must be a whole number >= 0, got {num_samples!r}")
    return SplitSpec(name=name, pattern=pattern, shards=shards, num_samples=num_samples)


def _read_lines(path: Path, file: Path, where: str) -> list[str]:
    if not file.is_file():
        raise _fail(path, f"{where}: {file} not found")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise _fail(path, f"{where}: {file} is empty")
    return lines


def _parse_task(path: Path, name: str, data: Any) -> TaskSpec:
    where = f"'classification.{name}'"
    if not isinstance(data, dict):
        raise _fail(path, f"{where} must be a mapping like {{root: wds_cifar10}}, got {data!r}")
    _check_keys(path, where, data, TASK_KEYS)
    base_dir = Path(os.path.abspath(path)).parent
    if "root" not in data and not all(k in data for k in ("shards", "classnames", "templates")):
        raise _fail(path, f"{where} needs 'root' (CLIP_benchmark layout) or all of shards, classnames, templates")
    root = data.get("root", "")
    shards = data.get("shards") or f"{root}/{data.get('split', 'test')}/*.tar"
    if isinstance(shards, str) and "*" in shards:  # CLIP_benchmark names shards 0.tar, 1.tar, ...
        pattern = Path(resolve_shard(shards, base_dir))
        found = sorted(pattern.parent.glob(pattern.name), key=lambda p: (len(p.name), p.name))
        if not found:
            raise _fail(path, f"{where}: no shards match {pattern}")
        shards = [str(p) for p in found]
    spec = _parse_split(path, name, {"shards": shards, "num_samples": data.get("num_samples")}, where)

    def lines_of(key: str, default_name: str) -> list[str]:
        return _read_lines(path, Path(resolve_shard(str(data.get(key) or f"{root}/{default_name}"), base_dir)), where)

    classnames, templates = lines_of("classnames", CLASSNAMES_FILE), lines_of("templates", TEMPLATES_FILE)
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise _fail(path, f"{where}: templates without '{{c}}' (where the class name goes): {bad[:3]}")
    return TaskSpec(name=name, shards=spec.shards, classnames=classnames, templates=templates, num_samples=spec.num_samples)


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
    if not isinstance(data, dict):
        raise _fail(path, f"expected a mapping with keys {list(TOP_LEVEL_KEYS)} at the top level")
    _check_keys(path, "the top level", data, TOP_LEVEL_KEYS)

    name = data.get("name", path.stem)
    description = data.get("description", "")
    if not isinstance(name, str) or not name:
        raise _fail(path, f"'name' must be a non-empty string, got {name!r}")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise _fail(path, f"'description' must be a string, got {description!r}")

    world = data.get("world")
    if world is not None and not (isinstance(world, dict) and isinstance(world.get("name"), str) and "version" in world):
        raise _fail(path, f"'world' must be a mapping with a name and a version, got {world!r}")

    fields = _parse_fields(path, data.get("fields"))

    splits_data = data.get("splits")
    if not splits_data:
        raise _fail(path, "no splits: add a 'splits' mapping, e.g. splits: {train: {shards: \"train-{000..009}.tar\"}}")
    if not isinstance(splits_data, dict):
        raise _fail(path, f"'splits' must be a mapping of split name to {{shards: ...}}, got {splits_data!r}")
    splits = {str(k): _parse_split(path, str(k), v) for k, v in splits_data.items()}

    tasks_data = data.get("classification") or {}
    if not isinstance(tasks_data, dict):
        raise _fail(path, f"'classification' must be a mapping of task name to {{root: ...}}, got {tasks_data!r}")
    tasks = {str(k): _parse_task(path, str(k), v) for k, v in tasks_data.items()}

    all_shards = [s for spec in [*splits.values(), *tasks.values()] for s in spec.shards]
    missing = [s for s in all_shards if not is_remote(s) and not Path(s).is_file()]
    if missing:
        listed = ", ".join(missing[:MAX_MISSING_LISTED])
        more = f" (and {len(missing) - MAX_MISSING_LISTED} more)" if len(missing) > MAX_MISSING_LISTED else ""
        raise _fail(path, f"{len(missing)} local shard(s) do not exist: {listed}{more}")

    return Manifest(
        name=name,
        description=description,
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
