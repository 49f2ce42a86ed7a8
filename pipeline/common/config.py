"""Typed configuration: `params.yaml` -> OmegaConf structured configs -> dataclasses -> functions.

This module holds the machinery and stage one's sections (corpus, teacher, teachers, extract, mine);
pipeline/common/params.py holds the rest (pretrain, train, students, evaluate, export) and the whole file.
Stage one imports only this module, so DVC, which lists it as a dependency of every stage, never re-runs the
teacher pass for an edit to a training option (tests/test_dvc_deps.py). Every option, its type, its default
and its one description live in one of the two: OmegaConf does the typed merge of params.yaml, `--set`
dotted overrides and explicit CLI options, refuses unknown keys and values of the wrong type, and checks
every mode (an enum) at load. Stage CLIs generate their options and `--help` from the fields
(`option_type`, `option_help`, `section_help`). `Section`, `opt` and `from_dict` also type other YAML
files the pipeline reads (corpus manifests).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pipeline.common.errors import PipelineError


class ConfigError(PipelineError, ValueError):
    """A params file or override that does not fit the typed config."""


def _choices(name: str, *values: str) -> type[StrEnum]:
    """A mode: a StrEnum whose members are named by their values, so `"hard-negative-aware"` in YAML
    loads, compares equal to the string and serialises as it."""
    return StrEnum(name, {v: v for v in values})


ImageFormat = _choices("ImageFormat", "png", "jpg")
Precision = _choices("Precision", "auto", "fp32", "bf16", "fp16")
EmbeddingDtype = _choices("EmbeddingDtype", "float16", "float32")
IndexKind = _choices("IndexKind", "auto", "flat", "ivf", "hnsw", "ivfpq")


def opt(default: Any = MISSING, doc: str = "", *, factory: Any = MISSING, at_least: float | None = None,
        above: float | None = None, at_most: float | None = None, below: float | None = None) -> Any:
    """A config field with its one description (shown by `--help` and `section_help`) and its one range check
    (`at_least` <= value, `above` < value, value <= `at_most`, value < `below`; None values are not checked),
    enforced whenever the section is built: at load, by `--set`, by a CLI option, or by code."""
    bounds = {k: v for k, v in (("at_least", at_least), ("above", above), ("at_most", at_most), ("below", below))
              if v is not None}
    return field(default=default, default_factory=factory, metadata={"doc": doc, "range": bounds})


_RANGE_TEXT = {"at_least": ">=", "above": ">", "at_most": "<=", "below": "<"}
_RANGE_OK = {"at_least": lambda v, b: v >= b, "above": lambda v, b: v > b,
             "at_most": lambda v, b: v <= b, "below": lambda v, b: v < b}


def _range_text(bounds: dict[str, float]) -> str:
    """">= 1", or "in (0, 1]" for two bounds."""
    if len(bounds) == 2:
        (lo_kind, lo), (hi_kind, hi) = sorted(bounds.items(), key=lambda kv: kv[0] not in ("at_least", "above"))
        return f"in {'[' if lo_kind == 'at_least' else '('}{lo:g}, {hi:g}{']' if hi_kind == 'at_most' else ')'}"
    (kind, bound), = bounds.items()
    return f"{_RANGE_TEXT[kind]} {bound:g}"


def _range_problem(value: Any, bounds: dict[str, float]) -> str | None:
    """"must be >= 1" when `value` is outside `bounds`, else None."""
    if value is None or not bounds or all(_RANGE_OK[k](value, b) for k, b in bounds.items()):
        return None
    return f"must be {_range_text(bounds)}"


class _RangeError(ConfigError):
    """A value outside its declared range (named by the section's KEY; `from_dict(where=)` names a keyless one)."""


class Section:
    """Every range (opt's bounds) is checked, and every mode checked against its enum, on construction (OmegaConf's load, or code building a
    config from strings) and then kept as the plain string: checkpoints (`torch.load(weights_only=True)`),
    Parquet metadata and JSON never meet an enum object."""

    KEY = ""  # where the section lives in params.yaml, for messages ("corpus", "optim", ...); "" = where it is built

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            problem = _range_problem(getattr(self, f.name), f.metadata.get("range", {}))
            if problem:
                raise _RangeError(f"{f'{self.KEY}.' if self.KEY else ''}{f.name} {problem}, got {getattr(self, f.name)!r}")
            hint = hints[f.name]
            if isinstance(hint, type) and issubclass(hint, Enum):
                value = getattr(self, f.name)
                try:
                    setattr(self, f.name, hint(value).value)
                except ValueError:
                    raise ConfigError(f"{type(self).__name__}.{f.name}: invalid value {value!r}, "
                                      f"expected one of {[m.value for m in hint]}") from None


@dataclass
class CorpusConfig(Section):
    """`dsmd corpus`: the synthetic captioned-scenes generator."""

    KEY = "corpus"

    out_dir: str = opt("data/synthetic", "where the WebDataset shards and manifest.yaml go")
    seed: int = opt(0, "seed of every scene, caption and split")
    train_images: int = opt(2000, "images of the target train split (the students train on it)", at_least=0)
    val_images: int = opt(500, "images of the val split (validation during training)", at_least=0)
    test_images: int = opt(1000, "images of the test split (evaluation)", at_least=0)
    web_images: int = opt(0, "images of an optional web split written as tars (the demo teacher now pretrains on "
                          "the world rendered on the fly, `dsmd pretrain`); none of its scenes is described like a test scene", at_least=0)
    zipf: float = opt(1.2, "colours, shapes and patterns have frequencies p(rank r) ~ 1 / (r + 1) ** zipf; 0 = uniform", at_least=0)
    image_size: int = opt(64, "side of the square images in pixels", at_least=16)
    samples_per_shard: int = opt(1000, "samples per .tar shard", at_least=1)
    near_duplicate_fraction: float = opt(0.3, "share of scenes generated as a near-duplicate of the previous "
                                         "scene (one attribute or relation changed)", at_least=0, at_most=1)
    min_captions: int = opt(2, "fewest captions per image", at_least=1)
    max_captions: int = opt(5, "most captions per image")
    image_format: ImageFormat = opt(ImageFormat.png, "png or jpg")
    workers: int = opt(0, "processes writing shards in parallel (output identical for any value); 0 = one per CPU core", at_least=0)


@dataclass
class TeacherConfig(Section):
    """`dsmd teacher`: which open_clip model is the teacher and where its weights come from."""

    KEY = "teacher"

    model: str = opt("dsmd-demo-teacher", "open_clip model config of the teacher (ViT-L-14, hf-hub:org/name, ...)")
    pretrained: str = opt("demo", "demo (the weights shipped in pipeline/pretrained/<model>, made by `dsmd pretrain`), "
                          "an open_clip tag (openai), hf-hub:org/name, local-dir:<folder>, a local checkpoint path, "
                          "or \"\" for random weights (tests only)")
    out_dir: str = opt("outputs/teachers/teacher", "where the teacher's identity goes (beside the added teachers of the "
                       "teachers section, in extract.teachers_dir/<name>)")


PRIMARY_TEACHER = "teacher"  # how train.teachers names the teacher of the `teacher` section (the features' own)


@dataclass
class AddedTeacherConfig(Section):
    """An entry of the `teachers` section: a teacher whose embeddings are added beside the features' own
    (`dsmd extract --teacher <name>`), reading the images again but rewriting nothing of the first."""

    KEY = "teachers.<name>"

    model: str = opt(MISSING, "open_clip model config of the teacher (ViT-L-14, hf-hub:org/name, ...)")
    pretrained: str = opt(MISSING, "its weights: demo, an open_clip tag, hf-hub:org/name, local-dir:<folder>, a "
                          "checkpoint path, or \"\" for random weights (tests only)")


@dataclass
class TeacherShare(Section):
    """One teacher of a student's ensemble target (train.teachers)."""

    KEY = "train.teachers.<name>"

    weight: float = opt(1.0, "its share of the ensemble's similarities", above=0)
    temperature: float = opt(1.0, "its similarities count as weight / temperature against the others' (a sharper "
                             "teacher, MobileCLIP2's per-teacher logit scale, in the one shared target)", above=0)


def teacher_shares(teachers: dict[str, TeacherShare]) -> dict[str, float]:
    """train.teachers / mine.teachers as name -> share of the target (weight / temperature; normalised by the user)."""
    return {name: share.weight / share.temperature for name, share in teachers.items()}


@dataclass
class ExtractConfig(Section):
    """`dsmd extract`: teacher embeddings of every image and caption, to Parquet."""

    KEY = "extract"

    manifest: str = opt("data/synthetic/manifest.yaml", "corpus manifest (WebDataset shards per split)")
    out_dir: str = opt("outputs/features", "features directory; one sub-folder per split")
    teachers_dir: str = opt("outputs/teachers", "`--teacher <name>`: the added teacher's embeddings go to "
                            "<teachers_dir>/<name>/<split>/, keyed to the features' ids")
    splits: list[str] = opt(doc="manifest splits to embed", factory=lambda: ["train", "val", "test"])
    batch_size: int = opt(256, "images (and as many captions) per teacher forward pass", at_least=1)
    num_workers: int = opt(1, "DataLoader processes decoding the shards", at_least=0)
    views: int = opt(0, "augmented views of each image embedded besides the plain one", at_least=0)
    view_splits: list[str] = opt(doc="the splits whose images get the views: the ones students train on (evaluation "
                                 "never reads views, and each view costs a teacher pass)", factory=lambda: ["train"])
    embedding_dtype: EmbeddingDtype = opt(EmbeddingDtype.float16, "float16 or float32 storage of the embeddings")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    precision: Precision = opt(Precision.auto, "auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 or fp16")
    threads: int = opt(0, "torch intra-op threads on CPU; 0 = torch's default", at_least=0)
    seed: int = opt(0, "seeds the augmentation views")
    zeroshot: bool = opt(True, "also embed the images and prompts of the manifest's classification tasks")
    store_images: bool = opt(False, "copy each image's bytes into the features (self-contained), instead of "
                             "referencing it by byte offset in its source shard (local uncompressed tars only)")
    verify_sample: int = opt(32, "images and as many captions of each split (and their views) that the teacher "
                             "embeds again after extraction, compared with the cache (dsmd verify); 0 = no check", at_least=0)
    verify_min_cosine: float = opt(0.999, "cosine a re-embedded row must reach against its cached row (float16 "
                                   "storage alone keeps it above 0.9999)", above=0, at_most=1)

    def views_of(self, split: str) -> int:
        """Stored views per image of `split`: `views` in the view_splits, none elsewhere."""
        return self.views if split in self.view_splits else 0


@dataclass
class MineConfig(Section):
    """`dsmd mine`: FAISS hard negatives from the cached teacher embeddings."""

    KEY = "mine"

    features_dir: str = opt("outputs/features", "features directory written by `dsmd extract`")
    out_dir: str = opt("outputs/negatives", "negatives directory; one sub-folder per split")
    splits: list[str] = opt(doc="splits to mine", factory=lambda: ["train"])
    k: int = opt(16, "hard negatives kept per query and direction", at_least=1)
    index: IndexKind = opt(IndexKind.auto, "auto (exact below exact_threshold vectors, else IVF-Flat), flat, ivf, hnsw or ivfpq")
    exact_threshold: int = opt(100_000, "auto picks exact search below this many database vectors", at_least=0)
    memory_budget_mb: int = opt(4096, "auto: exact and IVF-Flat indexes hold a float32 copy of the database; above "
                                "this many MiB IVF-PQ is used instead (pq_m bytes a vector, candidates re-scored from "
                                "the float16 array on disk), as autofaiss picks by memory; also caps the IVF training "
                                "sample. 0 = no limit", at_least=0)
    nlist: int = opt(0, "IVF lists; 0 = 4 * sqrt(N)", at_least=0)
    nprobe: int = opt(16, "IVF lists searched per query", at_least=1)
    hnsw_m: int = opt(32, "HNSW graph degree", at_least=1)
    ef_search: int = opt(128, "HNSW search depth", at_least=1)
    pq_m: int = opt(16, "IVF-PQ sub-quantizers", at_least=1)
    shard_vectors: int = opt(0, "IVF-PQ vectors a shard file holds (mining maps one shard at a time, so memory holds one "
                             "shard whatever the database size); 0 = as many as memory_budget_mb holds (no budget: "
                             "one index in memory)", at_least=0)
    refine_factor: int = opt(20, "IVF-PQ codes only rank: it searches refine_factor * depth candidates, then re-scores "
                             "them exactly (pq_m 16, N=200k, d=256: recall@10 0.63 with 4, 0.89 with 10, 0.999 with 20; "
                             "benchmarks/mine.py)", at_least=1)
    train_points_per_list: int = opt(64, "IVF k-means trains on a seeded sample of this many vectors per list", at_least=1)
    query_chunk: int = opt(4096, "queries searched at once (bounds memory)", at_least=1)
    threads: int = opt(0, "FAISS OpenMP threads; 0 = FAISS default", at_least=0)
    range_min: int = opt(0, "false-negative filter: skip the first range_min ranked candidates (off by default: the "
                         "corpus's near-duplicate scenes are the hard negatives wanted)", at_least=0)
    max_score: Optional[float] = opt(None, "false-negative filter: drop candidates scoring above this")
    margin: Optional[float] = opt(None, "false-negative filter: drop candidates scoring above positive_score - margin")
    relative_margin: Optional[float] = opt(None, "false-negative filter: drop candidates scoring above "
                                           "(1 - relative_margin) * positive_score")
    twin_threshold: Optional[float] = opt(None, "drop semantic twins: candidates owning a caption whose teacher cosine "
                                          "with a caption of the query's image is above this")
    recall_sample: int = opt(1000, "queries checked against exact search when the index is approximate", at_least=0)
    teachers: dict[str, TeacherShare] = opt(doc="whose similarities are mined, named as in train.teachers: {} = the "
                                            "features' own teacher; one name = that teacher; several = their ensemble "
                                            "target (weight / temperature shares)", factory=dict)
    teachers_dir: str = opt("outputs/teachers", "where `dsmd extract --teacher <name>` wrote the added teachers")
    seed: int = opt(0, "seeds index training samples and the recall check")


# The sections of params.yaml that only pipeline/common/params.py types: stage one skips them when it reads the file.
LATER_SECTIONS = ("pretrain", "train", "students", "evaluate", "export")


@dataclass
class StageOneParams:
    """The sections stage one reads (corpus -> teacher -> extract -> mine): all its CLIs load, and all they may depend on."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # name -> an added teacher: dvc.yaml extracts each in its own stage (extract_teacher@<name>, foreach)
    teachers: dict[str, AddedTeacherConfig] = field(default_factory=dict)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    mine: MineConfig = field(default_factory=MineConfig)

    def __post_init__(self) -> None:
        if PRIMARY_TEACHER in self.teachers:
            raise ConfigError(f"teachers.{PRIMARY_TEACHER}: the name is the `teacher` section's (the features' own "
                              f"teacher); give the added teacher another name")
        self.check_teacher_names(self.mine.teachers, "mine")

    def check_teacher_names(self, named: dict, where: str) -> None:
        """Every name of a teachers map (train.teachers, mine.teachers) is `teacher` or an added teacher."""
        unknown = sorted(set(named) - {PRIMARY_TEACHER, *self.teachers})
        if unknown:
            raise ConfigError(f"{where}.teachers names {unknown}, neither `{PRIMARY_TEACHER}` nor a teacher of the "
                              f"teachers section ({sorted(self.teachers)})")

    def added_teacher(self, name: str) -> TeacherConfig:
        """The teacher of the teachers section's entry `name`, as the teacher section would name it."""
        if name not in self.teachers:
            raise ConfigError(f"teachers.{name}: no such teacher; the teachers section declares {sorted(self.teachers)}")
        entry = self.teachers[name]
        return TeacherConfig(model=entry.model, pretrained=entry.pretrained)


def _config_error(exc: OmegaConfBaseException, where: str, key: str | None = None) -> ConfigError:
    """One line naming the section and key (`train.optim.lr: ...`); `key` when the caller knows it best."""
    key = key or exc.full_key
    full = f"{where}.{key}" if where and key else (key or where)
    unknown = isinstance(exc, (ConfigKeyError, AttributeError))
    return ConfigError(f"{full}: {'unknown key' if unknown else str(exc.msg).splitlines()[0]}")


def _typed(node: Any, where: str) -> Any:
    try:
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as exc:
        raise _config_error(exc, where) from None


def _shape_problem(cls: type, data: dict) -> str | None:
    """"key must be a mapping, got 3": a list or scalar where a mapping goes (or the reverse), which OmegaConf
    reports without naming the key."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        hint = hints.get(key)
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is typing.Union and len(args) == 1:
            hint = args[0]
        kind = dict if dataclasses.is_dataclass(hint) else typing.get_origin(hint)
        if value is not None and kind in (dict, list) and not isinstance(value, kind):
            return f"{key} must be a {'mapping' if kind is dict else 'list'}, got {value!r}"
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            problem = _shape_problem(hint, value)
            if problem:
                return f"{key}.{problem}"
    return None


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from `data`, refusing unknown keys and values of the wrong type."""
    problem = _shape_problem(cls, data)
    if problem:
        raise ConfigError(f"{where}.{problem}" if where else problem)
    try:
        node = OmegaConf.merge(OmegaConf.structured(cls), data)
    except OmegaConfBaseException as exc:
        raise _config_error(exc, where) from None
    try:
        return _typed(node, where)
    except _RangeError as exc:  # a keyless section (a manifest entry) is named by where it was built
        raise ConfigError(f"{where}.{exc}" if where and not getattr(cls, "KEY", "") else str(exc)) from None


def read_params(path: str | Path | None, root: type = StageOneParams) -> Any:
    """Read params.yaml into `root` (StageOneParams: stage one's sections; params.Params: the whole file); a
    missing section takes its defaults, `None` = all defaults. The sections `root` does not hold are left unread:
    they must be LATER_SECTIONS (anything else is an unknown key)."""
    if path is None:
        return root()
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    if isinstance(data.get("teacher"), dict) and "pretrain" in data["teacher"]:  # the layout before the fourteenth session
        raise ConfigError(f"{path}: teacher.pretrain: moved to a section of its own, `pretrain:` at the top level "
                          f"(the same keys)")
    held = {f.name for f in dataclasses.fields(root)}
    data = {k: v for k, v in data.items() if k in held or k not in LATER_SECTIONS}
    try:
        return from_dict(root, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def apply_overrides(config: Any, overrides: dict[str, Any], where: str = "") -> Any:
    """Return a copy of `config` with dotted-key overrides (`{"optim.lr": 0.01}`) applied; `None` values are ignored."""
    node = OmegaConf.structured(config)
    for dotted, value in overrides.items():
        if value is None:
            continue
        try:
            OmegaConf.update(node, dotted, value, merge=False)  # a mapping value replaces the mapping
        except OmegaConfBaseException:
            tree = value  # an entry of a map of sections (`teachers.b.weight`, `teachers.b: {}`) is only built
            for key in reversed(dotted.split(".")):  # typed by a merge of the whole tree
                tree = {key: tree}
            try:
                node = OmegaConf.merge(node, tree)
            except OmegaConfBaseException as exc:
                raise _config_error(exc, where, dotted) from None
    return _typed(node, where)


def parse_set_options(items: list[str] | None) -> dict[str, Any]:
    """`--set optim.lr=0.01` strings -> {"optim.lr": 0.01}; values are parsed as YAML scalars."""
    result: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        result[key.strip()] = "" if value is None and raw.strip() == "" else value  # --set live_dir= means ""
    return result


def to_dict(config: Any) -> dict:
    """Plain data (modes as strings), for JSON summaries and hashes."""
    return OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True)


def stage_config(params_path: str | Path | None, section: str, options: dict[str, Any], sets: list[str] | None = None,
                 student: str | None = None, root: type = StageOneParams) -> Any:
    """The typed config a stage runs with: params.yaml's `section` of `root` (for `train` with `student`: that entry of
    the students section over it, params.Params only), then `--set` overrides, then explicit CLI options (None = not
    given). A missing default `params.yaml` means all defaults."""
    path = Path(params_path) if params_path is not None else None
    params = read_params(path if path is not None and (path.exists() or path.name != "params.yaml") else None, root)
    config = params.student(student) if student else getattr(params, section)
    config = apply_overrides(config, parse_set_options(sets), section)
    return apply_overrides(config, options, section)


def _field(cls: type, dotted: str) -> tuple[dataclasses.Field, Any]:
    hints = typing.get_type_hints(cls)
    head, _, rest = dotted.partition(".")
    found = {f.name: f for f in dataclasses.fields(cls)}[head]
    return _field(hints[head], rest) if rest else (found, hints[head])


def option_type(section: str, dotted: str, root: type = StageOneParams) -> Any:
    """The declared type of `section.dotted` (`Optional[float]` -> float), from which a CLI option is generated."""
    _, hint = _field(root, f"{section}.{dotted}")
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def option_help(section: str, dotted: str, root: type = StageOneParams) -> str:
    """The CLI help of an option that sets `section.dotted`: its one description, and where it lives."""
    found, _ = _field(root, f"{section}.{dotted}")
    bounds = found.metadata.get("range")
    return f"{found.metadata['doc']}{f'; {_range_text(bounds)}' if bounds else ''} (params: {section}.{dotted})"


def _describe(cls: type, prefix: str, defaults: Any = None) -> list[str]:
    """`defaults`: the instance a parent's factory makes for this section (pretrain.optim is not OptimConfig()), whose
    values are the defaults shown."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            lines.append(f"{prefix}{f.name}: {f.metadata.get('doc', '')}")
            nested = getattr(defaults, f.name) if defaults is not None else (
                f.default_factory() if f.default_factory is not MISSING else None)
            lines += _describe(hint, f"{prefix}{f.name}.", nested)
            continue
        if f.default is MISSING and f.default_factory is MISSING:
            lines.append(f"{prefix}{f.name} = (required): {f.metadata['doc']}")
            continue
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not MISSING else f.default_factory()
        shown = default.value if isinstance(default, Enum) else default
        bounds = f.metadata.get("range")
        lines.append(f"{prefix}{f.name} = {shown!r}: {f.metadata['doc']}{f' ({_range_text(bounds)})' if bounds else ''}")
    return lines


def section_help(section: str, root: type = StageOneParams) -> str:
    """Every key of a params.yaml section with its default and description (a stage's `--help` epilog)."""
    cls = typing.get_type_hints(root)[section]
    entry = typing.get_args(cls)[1] if typing.get_origin(cls) is dict else None  # a map of sections: one entry's keys
    if entry is not None:
        return "\b\n" + f"params.yaml section `{section}`, each entry (<name>: {{...}}):\n" + "\n".join(
            "  " + line for line in _describe(entry, "<name>."))
    # \b keeps click from re-wrapping the list into one paragraph
    return "\b\n" + f"params.yaml section `{section}` (set with --set KEY=VALUE):\n" + "\n".join(
        "  " + line for line in _describe(cls, ""))
