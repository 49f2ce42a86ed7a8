"""Typed configuration: `params.yaml` -> dataclasses -> functions.

Every default lives here and only here. Stage CLIs take `--params` plus a few options whose
defaults are `None`, meaning "what params.yaml (or, failing that, this module) says", so the CLI
and the library can never disagree about a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from pipeline.errors import PipelineError


class ConfigError(PipelineError, ValueError):
    """A params file or override that does not fit the typed config."""


@dataclass
class CorpusConfig:
    """`dsmd corpus`: the synthetic captioned-scenes generator."""

    out_dir: str = "data/synthetic"
    seed: int = 0
    train_images: int = 5000
    val_images: int = 500
    test_images: int = 1000
    # the web corpus: only the demo teacher pretrains on it (as a real teacher saw LAION, not Flickr30k)
    web_images: int = 40000
    # colours, shapes and patterns have Zipf-like frequencies p(rank r) ~ 1 / (r + 1) ** zipf; 0 = uniform
    zipf: float = 1.2
    image_size: int = 64
    samples_per_shard: int = 1000
    # share of scenes generated as a near-duplicate of the previous scene (one attribute or relation changed)
    near_duplicate_fraction: float = 0.3
    min_captions: int = 2
    max_captions: int = 5
    image_format: str = "png"  # png | jpg
    # processes writing shards in parallel (output is identical for any value); 0 = one per CPU core
    workers: int = 0


@dataclass
class OptimConfig:
    """The optimisation loop shared by the demo teacher, the DSMD student and the baseline."""

    epochs: float = 1.0
    max_steps: int = 0  # > 0 caps the number of optimizer steps (overrides epochs)
    batch_size: int = 128  # global batch (across ranks and accumulation)
    accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    grad_clip: float = 1.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast only on a GPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    num_workers: int = 0
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    checkpoint_every: int = 0  # optimizer steps between resumable checkpoints; 0 = only at the end
    log_every: int = 10


@dataclass
class TeacherConfig:
    """Which open_clip model is the teacher; with `pretrained: demo`, how to pretrain it here."""

    model: str = "dsmd-demo-teacher"
    # "demo" (pretrain on the corpus), an open_clip tag ("openai"), "hf-hub:org/name", a local
    # checkpoint path, or "" for random weights (tests only)
    pretrained: str = "demo"
    out_dir: str = "outputs/teacher"
    manifest: str = "data/synthetic/manifest.yaml"  # corpus used to pretrain the demo teacher
    split: str = "web"  # its split the demo teacher pretrains on (the students never see it)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class ExtractConfig:
    """`dsmd extract`: teacher embeddings of every image and caption, to Parquet."""

    manifest: str = "data/synthetic/manifest.yaml"
    out_dir: str = "outputs/features"
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    batch_size: int = 256
    num_workers: int = 1
    views: int = 0  # augmented views of each image embedded besides the plain one
    embedding_dtype: str = "float16"  # float16 | float32
    device: str = "auto"
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    threads: int = 0
    seed: int = 0  # seeds the augmentation views
    zeroshot: bool = True  # also embed the images and prompts of the manifest's `classification:` tasks


@dataclass
class MineConfig:
    """`dsmd mine`: FAISS hard negatives from the cached teacher embeddings."""

    features_dir: str = "outputs/features"
    out_dir: str = "outputs/negatives"
    splits: list[str] = field(default_factory=lambda: ["train"])
    k: int = 16
    index: str = "auto"  # auto | flat | ivf | hnsw | ivfpq
    exact_threshold: int = 100_000  # auto picks exact search below this many database vectors
    nlist: int = 0  # IVF lists; 0 = 4 * sqrt(N)
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 128
    pq_m: int = 16
    # IVF-PQ codes only rank: it searches refine_factor * depth candidates, then re-scores them exactly
    # (pq_m 16 at N=200k, d=256: recall@10 0.63 with 4, 0.89 with 10, 0.999 with 20; benchmarks/mine.py)
    refine_factor: int = 20
    # IVF k-means trains on a seeded sample of this many vectors per list (bounds training time)
    train_points_per_list: int = 64
    query_chunk: int = 4096
    threads: int = 0  # FAISS OpenMP threads; 0 = FAISS default
    # false-negative filters (sentence-transformers' mine_hard_negatives knobs); off by default: the
    # corpus's near-duplicate scenes are the hard negatives wanted (see pipeline/mining.py)
    range_min: int = 0  # skip the first range_min ranked candidates
    max_score: Optional[float] = None  # drop candidates scoring above this
    margin: Optional[float] = None  # drop candidates scoring above positive_score - margin
    relative_margin: Optional[float] = None  # drop candidates scoring above (1 - relative_margin) * positive_score
    # drop semantic twins: candidates owning a caption with teacher text-text cosine above this with a
    # caption of the query's image (paraphrases of a positive that exact matching misses)
    twin_threshold: Optional[float] = None
    recall_sample: int = 1000  # queries checked against exact search when the index is approximate
    seed: int = 0


@dataclass
class BalancerConfig:
    """How the loss terms are weighted (formulas in pipeline/balancer.py)."""

    # calibrated (own early size, smoothed DWA, task share) | dynamic (faithful DWA + magnitude
    # equalisation) | authors (their code: w_i = (k/n) max L / L_i) | fixed | uniform
    mode: str = "calibrated"
    temperature: float = 1.0  # DWA softmax temperature (calibrated, dynamic)
    # by loss name (feature, similarity, contrastive, hard_negative, task): mode fixed, the weights;
    # mode calibrated, priors on the distillation terms (normalised to mean 1; missing = 1)
    weights: dict[str, float] = field(default_factory=dict)
    task_share: float = 0.5  # calibrated: the task term's share of the objective
    # calibrated: when set, the task share moves linearly from task_share to this over the run
    # (distillation strongest early, the task taking over late)
    task_share_end: Optional[float] = None
    calibration_steps: int = 20  # calibrated: steps whose mean loss is each term's reference size
    window: int = 20  # calibrated: EMA time constant (steps) of the smoothed DWA rates
    # mode dynamic: cap on each weight; 0 = none (faithful). m_i = max L / L_i is unbounded as a term nears 0
    max_weight: float = 0.0


@dataclass
class DistillConfig:
    """The four DSMD scales plus the task loss; each can be switched off for ablations."""

    feature: bool = True
    similarity: bool = True
    contrastive: bool = True
    hard_negative: bool = True
    # not one of the paper's four scales: TinyCLIP / CLIP-KD relational distillation of the in-batch
    # image-text similarity distributions (see pipeline/losses.py AffinityDistillLoss)
    affinity: bool = False
    affinity_temperature: float = 0.05
    task: bool = True
    queue_size: int = 8192
    temperature: float = 0.05
    # hard-negative margin: teacher (the teacher's own score gap; only pairs it orders right count) | fixed
    margin_mode: str = "teacher"
    margin: float = 0.2  # margin_mode fixed: the paper's margin
    hard_negatives: int = 4  # mined negatives looked up per sample and direction
    balancer: BalancerConfig = field(default_factory=BalancerConfig)


@dataclass
class TrainConfig:
    """`dsmd train`: the student, from the shards (dsmd or clip loss) or from the corpus (clip loss)."""

    model: str = "dsmd-tiny-student"
    pretrained: str = ""  # initial student weights: "" = random, or a checkpoint path
    loss: str = "dsmd"  # dsmd | clip
    source: str = "shards"  # shards | corpus
    features_dir: str = "outputs/features"
    negatives_dir: str = "outputs/negatives"
    manifest: str = "data/synthetic/manifest.yaml"  # with source: corpus
    split: str = "train"
    out_dir: str = "outputs/students/dsmd"
    batching: str = "random"  # random | hard-negative-aware
    # hard-negative-aware: mined i2i neighbours placed beside each anchor. Small groups keep batches
    # diverse; whole neighbour lists (16) fill a batch with near-duplicates whose captions collide.
    batch_neighbours: int = 3
    use_views: bool = True  # re-apply stored augmentation views when the shards have them
    # the student -> teacher width projection starts with orthonormal columns (orthogonal: at first the
    # projected cosines are the student's own) or as torch's default Linear init (default, which made
    # the DSMD student's quality swing by 30 RSUM between seeds; README)
    projection_init: str = "orthogonal"
    # > 0: train on the first max_images images of the split only (scaling curves); mined negatives
    # outside them are dropped, so nothing of the other images reaches the student
    max_images: int = 0
    live_dir: str = "auto"  # DVCLive folder (metrics.json + plots): auto = <out_dir>/dvclive, "" = off
    # every val_every steps (0 = never), retrieval on the first val_images images of val_split (with source
    # shards): logged as val_rsum, val_i2t_r1, val_t2i_r1
    val_split: str = "val"
    val_every: int = 50
    val_images: int = 256
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class EvaluateConfig:
    """`dsmd evaluate`: retrieval quality and encoder cost, teacher against students."""

    features_dir: str = "outputs/features"
    split: str = "test"
    teacher_dir: str = "outputs/teacher"
    students: dict[str, str] = field(
        default_factory=lambda: {"dsmd": "outputs/students/dsmd", "baseline": "outputs/students/baseline"}
    )
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    chunk_size: int = 1024
    batch_size: int = 256
    latency_repeats: int = 20
    throughput_batch: int = 64
    throughput_repeats: int = 5  # timed batches of throughput_batch per model (big teachers are slow on CPU)
    allow_missing: bool = False  # skip (with a warning) a student whose dir is missing instead of failing
    device: str = "auto"
    threads: int = 0
    metrics_file: str = "outputs/metrics.json"
    plots_dir: str = "outputs/plots"
    zeroshot: bool = True  # zero-shot classification on every task extracted into features_dir/zeroshot/


@dataclass
class ExportConfig:
    """`dsmd export`: the student as it will be used (safetensors + open_clip config, ONNX, model card)."""

    student: str = "dsmd"  # the name the student has in evaluate.students and the metrics file
    student_dir: str = "outputs/students/dsmd"
    features_dir: str = "outputs/features"  # the teacher's identity and the check images come from here
    split: str = "test"  # whose images and captions the export checks run on
    metrics_file: str = "outputs/metrics.json"  # the figures of the model card
    out_dir: str = "outputs/export/dsmd"
    onnx: bool = True  # also write image_encoder.onnx and text_encoder.onnx (dynamic batch)
    opset: int = 17
    check_images: int = 32  # images (and as many captions) the reload and ONNX checks compare
    onnx_tolerance: float = 1e-4  # max abs difference of onnxruntime's embeddings from PyTorch's (fp32)


@dataclass
class Params:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {str(k): _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            converted = hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return converted
    if hint is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from `data`, refusing unknown keys and values of the wrong type."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {unknown}; known: {sorted(names)}"
        )
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def load_params(path: str | Path | None) -> Params:
    """Read params.yaml; a missing section takes this module's defaults. `None` = all defaults."""
    if path is None:
        return Params()
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    try:
        return from_dict(Params, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of `config` with dotted-key overrides (`{"optim.lr": 0.01}`) applied; `None` values are ignored."""
    data = dataclasses.asdict(config)
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            if p not in node or not isinstance(node[p], dict):
                raise ConfigError(f"unknown option {dotted}")
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"unknown option {dotted}")
        node[leaf] = value
    return from_dict(type(config), data)


def parse_set_options(items: list[str] | None) -> dict[str, Any]:
    """`--set optim.lr=0.01` strings -> {"optim.lr": 0.01}; values are parsed as YAML scalars."""
    result: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        result[key.strip()] = yaml.safe_load(raw)
    return result


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def stage_config(params_path: str | Path | None, section: str, options: dict[str, Any], sets: list[str] | None = None) -> Any:
    """The typed config a stage runs with: params.yaml's `section`, then `--set` overrides, then
    explicit CLI options (None = not given). A missing default `params.yaml` means all defaults."""
    path = Path(params_path) if params_path is not None else None
    params = load_params(path if path is not None and (path.exists() or path.name != "params.yaml") else None)
    config = getattr(params, section)
    config = apply_overrides(config, parse_set_options(sets))
    return apply_overrides(config, options)
