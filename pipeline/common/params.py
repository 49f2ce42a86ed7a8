"""Typed configuration of everything stage one never reads: the demo teacher's pretraining (`dsmd pretrain`),
the students (train, students), evaluate and export, and `Params`, the whole params.yaml.

Stage one's sections and the machinery (`opt`, `Section`, `from_dict`, ...) live in pipeline/common/config.py.
Stage one never imports this module (tests/test_dvc_deps.py, tests/test_structure.py): an option added or
documented here re-runs training, evaluation or export, never the teacher pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.common.config import (ConfigError, Precision, Section, StageOneParams, TeacherShare, _choices,
                                    apply_overrides, opt, read_params, section_help as _section_help,
                                    stage_config as _stage_config)

BalancerMode = _choices("BalancerMode", "calibrated", "dynamic", "authors", "fixed", "uniform")
MarginMode = _choices("MarginMode", "teacher", "fixed")
LossMode = _choices("LossMode", "dsmd", "clip")
Source = _choices("Source", "shards", "corpus", "world")
Batching = _choices("Batching", "random", "hard-negative-aware")
ProjectionInit = _choices("ProjectionInit", "orthogonal", "default")
DataLoading = _choices("DataLoading", "auto", "memory", "stream")
TeachersTarget = _choices("TeachersTarget", "ensemble", "each")


@dataclass
class OptimConfig(Section):
    """The optimisation loop shared by the demo teacher, the DSMD student and the baseline."""

    KEY = "optim"

    epochs: float = opt(1.0, "passes over the training images (fractions allowed)", at_least=0)
    max_steps: int = opt(0, "> 0 caps the optimizer steps (overrides epochs)", at_least=0)
    batch_size: int = opt(128, "global batch size, across ranks and accumulation (contrastive losses need 2)", at_least=2)
    accum_steps: int = opt(1, "gradient accumulation steps per optimizer step", at_least=1)
    lr: float = opt(1e-3, "peak AdamW learning rate (linear warmup, cosine decay)", above=0)
    weight_decay: float = opt(0.1, "AdamW weight decay (not on gains, biases, logit scale)", at_least=0)
    warmup_steps: int = opt(50, "linear learning-rate warmup steps", at_least=0)
    grad_clip: float = opt(1.0, "gradient norm clip; 0 = none", at_least=0)
    precision: Precision = opt(Precision.auto, "auto, fp32, bf16 or fp16 (autocast only on a GPU)")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    seed: int = opt(0, "seed of initialisation, shuffling and augmentation")
    init_seed: int = opt(-1, "seed of the initial weights alone; -1 = seed (apart, a seed spread splits into its two causes)",
                         at_least=-1)
    num_workers: int = opt(0, "DataLoader worker processes", at_least=0)
    threads: int = opt(0, "torch intra-op threads on CPU; 0 = torch's default", at_least=0)
    checkpoint_every: int = opt(0, "optimizer steps between resumable checkpoints; 0 = only at the end", at_least=0)
    log_every: int = opt(10, "optimizer steps between log lines", at_least=1)


def _pretrain_optim() -> "OptimConfig":
    return OptimConfig(epochs=1.0, batch_size=256, lr=0.004, warmup_steps=150, num_workers=1, threads=2,
                       checkpoint_every=100, log_every=20)


@dataclass
class UnmaskedConfig(Section):
    """FLIP's unmasked tuning (Li et al. 2023, section 3): after pretraining with patch dropout, a short run with it off,
    so the image tower sees whole images once, as at inference. The demo teacher's pretraining drops 3/4 of its
    patches: the tuning lifts its retrieval most for least (docs/results.md). Every other setting is pretrain.optim's."""

    KEY = "unmasked"

    images: int = opt(0, "fresh scenes of the tuning, those after the pretraining's world_images; 0 = no tuning", at_least=0)
    lr: float = opt(0.002, "peak learning rate (linear warmup, cosine decay to 0)", above=0)
    warmup_steps: int = opt(15, "linear learning-rate warmup steps", at_least=0)


@dataclass
class PretrainConfig(Section):
    """`dsmd pretrain`: the demo teacher (teacher.model) pretrained on the synthetic world of the corpus section."""

    KEY = "pretrain"

    world_images: int = opt(819200, "fresh scenes of the world the teacher sees, each once: rendered in the loader "
                            "workers, never written (the target train split is 2,000 images)", at_least=1)
    work_dir: str = opt("outputs/teacher-pretrain", "the run's checkpoint and logs (resumable with --resume)")
    out_dir: str = opt("pipeline/pretrained/dsmd-demo-teacher", "the open_clip local-dir folder written at the end "
                       "(safetensors, open_clip_config.json, card.json): where `pretrained: demo` finds it")
    optim: OptimConfig = opt(doc="the pretraining loop", factory=_pretrain_optim)
    unmasked: UnmaskedConfig = opt(doc="FLIP's unmasked tuning after the pretraining", factory=UnmaskedConfig)


@dataclass
class BalancerConfig(Section):
    """How the loss terms are weighted (formulas in pipeline/training/balancer.py)."""

    KEY = "balancer"

    mode: BalancerMode = opt(BalancerMode.dynamic, "dynamic (the paper's DWA + magnitude equalisation), calibrated "
                             "(own early size, smoothed DWA, task share), authors (their code: w_i = (k/n) max L / L_i), "
                             "fixed or uniform")
    temperature: float = opt(1.0, "DWA softmax temperature (calibrated, dynamic)", above=0)
    weights: dict[str, float] = opt(doc="by loss name (feature, similarity, contrastive, hard_negative, task): mode "
                                    "fixed, the weights; mode calibrated, priors on the distillation terms "
                                    "(normalised to mean 1; missing = 1)", factory=dict)
    task_share: float = opt(0.5, "calibrated: the task term's share of the objective", at_least=0, below=1)
    task_share_end: Optional[float] = opt(None, "calibrated: when set, the task share moves linearly from task_share "
                                          "to this over the run", at_least=0, at_most=1)
    calibration_steps: int = opt(20, "calibrated: steps whose mean loss is each term's reference size", at_least=1)
    window: int = opt(20, "calibrated: EMA time constant (steps) of the smoothed DWA rates", at_least=1)
    max_weight: float = opt(0.0, "dynamic: cap on each weight; 0 = none (faithful: max L / L_i is unbounded as a term nears 0)", at_least=0)


@dataclass
class DistillConfig(Section):
    """The four DSMD scales plus the task loss; each can be switched off for ablations."""

    KEY = "distill"

    feature: bool = opt(True, "feature scale: L1 between projected student and teacher embeddings")
    similarity: bool = opt(True, "similarity scale: per-sample cosine with the teacher embedding")
    contrastive: bool = opt(True, "contrastive scale: InfoNCE against a queue of teacher embeddings")
    hard_negative: bool = opt(True, "hard-negative scale: triplets with the mined negatives")
    affinity: bool = opt(False, "not one of the paper's scales: TinyCLIP / CLIP-KD relational distillation of the "
                         "in-batch image-text similarity distributions")
    affinity_temperature: float = opt(0.05, "temperature of the affinity distributions", above=0)
    task: bool = opt(True, "the CLIP task loss on the student's own embeddings")
    queue_size: int = opt(8192, "teacher embeddings in the contrastive queue", at_least=1)
    temperature: float = opt(0.05, "contrastive-scale temperature", above=0)
    margin_mode: MarginMode = opt(MarginMode.teacher, "hard-negative margin: teacher (the teacher's own score gap; "
                                  "only pairs it orders right count) or fixed")
    margin: float = opt(0.2, "margin_mode fixed: the margin (the paper's 0.2)", at_least=0)
    hard_negatives: int = opt(4, "mined negatives looked up per sample and direction", at_least=0)
    balancer: BalancerConfig = opt(doc="how the terms are weighted", factory=BalancerConfig)


@dataclass
class TrainConfig(Section):
    """`dsmd train`: the student, from the shards (dsmd or clip loss) or from the corpus (clip loss)."""

    KEY = "train"

    model: str = opt("dsmd-tiny-student", "open_clip model config of the student")
    pretrained: str = opt("", "initial student weights: \"\" = random, or a checkpoint path")
    loss: LossMode = opt(LossMode.dsmd, "dsmd (distillation + task loss) or clip (CLIP loss alone)")
    source: Source = opt(Source.shards, "shards (the features), corpus (the manifest's WebDataset shards; clip loss "
                         "only) or world (the synthetic world rendered on the fly: `dsmd pretrain` only)")
    features_dir: str = opt("outputs/features", "cached teacher features written by `dsmd extract`")
    negatives_dir: str = opt("outputs/negatives", "mined hard negatives written by `dsmd mine`")
    teachers: dict[str, TeacherShare] = opt(doc="loss dsmd: the teachers distilled from, as one ensemble target (each "
                                            "teacher's unit embeddings concatenated, scaled by sqrt(weight / temperature), "
                                            "so the target's cosine is their weighted mean). {} = the features' own "
                                            "teacher alone; `teacher` names it, other names the teachers section's",
                                            factory=dict)
    teachers_dir: str = opt("outputs/teachers", "where `dsmd extract --teacher <name>` wrote the added teachers")
    teachers_target: TeachersTarget = opt(TeachersTarget.ensemble, "with several teachers: ensemble (one target, "
                                          "above) or each (every DSMD term against each teacher in its own width, "
                                          "through its own rows of the projection, its contrastive temperature "
                                          "distill.temperature x its temperature, the terms summed by weight)")
    manifest: str = opt("data/synthetic/manifest.yaml", "corpus manifest used with source corpus")
    split: str = opt("train", "the split trained on")
    out_dir: str = opt("outputs/students/dsmd", "where the student, checkpoint.pt, train_log.jsonl and train_summary.json go")
    batching: Batching = opt(Batching.random, "random, or hard-negative-aware (mined i2i neighbours beside each anchor)")
    batch_neighbours: int = opt(3, "hard-negative-aware: neighbours placed beside each anchor (whole lists of 16 fill a "
                                "batch with near-duplicates whose captions collide)", at_least=0)
    use_views: bool = opt(True, "re-apply stored augmentation views when the shards have them: distilling, with the "
                          "teacher's embeddings of each view; the CLIP-only loss, as plain augmentation")
    projection_init: ProjectionInit = opt(ProjectionInit.orthogonal, "the student -> teacher width projection starts with "
                                          "orthonormal columns (orthogonal) or as torch's default Linear init (default)")
    init_logit_scale: float = opt(0.0, "the CLIP logit scale (1 / temperature) the student starts from; 0 = the model "
                                  "config's (open_clip: 1 / 0.07 = 14.3)", at_least=0, at_most=100)
    image_mean: list[float] = opt(doc="the student's input normalisation, per RGB channel in [0, 1] pixels (saved in "
                                  "its open_clip_config.json preprocess_cfg); [] = the model's (OpenAI's)", factory=list)
    image_std: list[float] = opt(doc="the student's input normalisation std, per RGB channel; [] = the model's", factory=list)
    force_patch_dropout: Optional[float] = opt(None, "the image tower's patch dropout in training, over the model "
                                               "config's (open_clip's force_patch_dropout; 0 = off, as in FLIP's unmasked "
                                               "tuning); unset = the config's", at_least=0, below=1)
    max_images: int = opt(0, "> 0: train on the first max_images images of the split only; mined negatives outside "
                          "them are dropped", at_least=0)
    data_loading: DataLoading = opt(DataLoading.auto, "the teacher embeddings (source shards): memory (loaded whole), "
                                    "stream (rows read per batch from the split's .npy files; memory stays flat as the "
                                    "corpus grows), or auto (stream above stream_above_mb). Referenced images are always "
                                    "read per sample; copied ones (extract.store_images) are held in memory")
    stream_above_mb: int = opt(1024, "auto: stream when the split's embedding arrays exceed this many MiB", at_least=0)
    live_dir: str = opt("auto", "DVCLive folder (metrics.json + plots): auto = <out_dir>/dvclive, \"\" = off")
    val_split: str = opt("val", "split of the validation retrieval (source shards)")
    val_every: int = opt(50, "steps between validations (val_rsum, val_i2t_r1, val_t2i_r1); 0 = never", at_least=0)
    val_images: int = opt(256, "validation on the first val_images images of val_split", at_least=1)
    optim: OptimConfig = opt(doc="the optimisation loop", factory=OptimConfig)
    distill: DistillConfig = opt(doc="the loss terms (loss dsmd)", factory=DistillConfig)


@dataclass
class EvaluateConfig(Section):
    """`dsmd evaluate`: retrieval quality and encoder cost, teacher against students."""

    KEY = "evaluate"

    features_dir: str = opt("outputs/features", "features directory (the teacher's embeddings and the test images)")
    split: str = opt("test", "split evaluated")
    teacher_dir: str = opt("outputs/teachers/teacher", "the teacher's directory (its identity, and weights for the cost)")
    teachers: list[str] = opt(doc="added teachers reported beside the teacher (from their cached embeddings), with "
                              "their equal-share ensemble; [] = every teacher of the teachers section", factory=list)
    teachers_dir: str = opt("outputs/teachers", "where `dsmd extract --teacher <name>` wrote the added teachers")
    students: dict[str, str] = opt(doc="name -> student directory; {} = every student of the students section, "
                                   "in students_dir/<name>", factory=dict)
    students_dir: str = opt("outputs/students", "where the students of the students section are trained (dvc.yaml)")
    ks: list[int] = opt(doc="recall cut-offs", factory=lambda: [1, 5, 10])
    chunk_size: int = opt(1024, "query rows scored at once", at_least=1)
    batch_size: int = opt(256, "images or captions per student forward pass", at_least=1)
    latency_repeats: int = opt(20, "timed single-sample calls per model", at_least=1)
    throughput_batch: int = opt(64, "batch of the throughput timing", at_least=1)
    throughput_repeats: int = opt(5, "timed batches of throughput_batch per model (big teachers are slow on CPU)", at_least=1)
    allow_missing: bool = opt(False, "skip (with a warning) a student whose dir is missing instead of failing")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    threads: int = opt(0, "torch intra-op threads on CPU; 0 = torch's default", at_least=0)
    metrics_file: str = opt("outputs/metrics.json", "the metrics JSON")
    plots_dir: str = opt("outputs/plots", "where the PNG plots and their data go")
    zeroshot: bool = opt(True, "zero-shot classification on every task extracted into features_dir/zeroshot/")
    report_dir: str = opt("outputs/report", "index.html: the metrics, the plots and what each model retrieves for "
                          "chosen test captions and images (a static page); \"\" = none")
    report_queries: int = opt(8, "test captions of the report's gallery (half naming the split's rarest words)", at_least=0)
    report_images: int = opt(4, "test images of the report's gallery (each model's top captions)", at_least=0)


@dataclass
class ExportConfig(Section):
    """`dsmd export`: the student as it will be used (safetensors + open_clip config, ONNX, model card)."""

    KEY = "export"

    student: str = opt("dsmd", "the student's name in evaluate.students and the metrics file")
    student_dir: str = opt("outputs/students/dsmd", "the trained student's directory")
    features_dir: str = opt("outputs/features", "the teacher's identity and the check images come from here")
    split: str = opt("test", "whose images and captions the export checks run on")
    metrics_file: str = opt("outputs/metrics.json", "the figures of the model card")
    out_dir: str = opt("outputs/export/dsmd", "where the exported files go")
    onnx: bool = opt(True, "also write image_encoder.onnx and text_encoder.onnx (dynamic batch)")
    opset: int = opt(17, "ONNX opset")
    check_images: int = opt(32, "images (and as many captions) the reload and ONNX checks compare", at_least=1)
    onnx_tolerance: float = opt(1e-4, "max abs difference of onnxruntime's embeddings from PyTorch's (fp32)", above=0)


def _default_students() -> dict[str, Any]:
    return {"dsmd": {"loss": "dsmd"}, "baseline": {"loss": "clip"}}


@dataclass
class Params(StageOneParams):
    """The whole params.yaml: stage one's sections (StageOneParams) and everything stage one never reads."""

    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # name -> the keys of the train section this student sets differently (its loss, its distill terms, ...):
    # dvc.yaml trains one stage per entry (foreach), each tracking `train` and its own entry only
    students: dict[str, Any] = field(default_factory=dict)  # none declared: _default_students()
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.students:  # (a dataclass default would be merged with, not replaced by, params.yaml's section)
            self.students = _default_students()
        for name in self.students:
            self.student(name)  # every entry is checked like the train section, at load
        if not self.evaluate.teachers:
            self.evaluate.teachers = list(self.teachers)
        if not self.evaluate.students:
            self.evaluate.students = {name: f"{self.evaluate.students_dir}/{name}" for name in self.students}

    def student(self, name: str) -> "TrainConfig":
        """The train section with student `name`'s entry of the students section applied."""
        if name not in self.students:
            raise ConfigError(f"students.{name}: no such student; the students section declares {sorted(self.students)}")
        entry = self.students[name] or {}
        if not isinstance(entry, dict):
            raise ConfigError(f"students.{name}: expected a mapping of train keys, got {entry!r}")
        student = apply_overrides(self.train, _dotted(entry), f"students.{name}")
        self.check_teacher_names(student.teachers, f"students.{name}: train")
        return student


def load_params(path: str | Path | None) -> Params:
    """Read the whole params.yaml (every section typed and checked); `None` = all defaults."""
    return read_params(path, Params)


def stage_config(params_path: str | Path | None, section: str, options: dict[str, Any], sets: list[str] | None = None,
                 student: str | None = None) -> Any:
    """config.stage_config over the whole file: a stage-two section, checked with every other."""
    return _stage_config(params_path, section, options, sets, student, root=Params)


def section_help(section: str) -> str:
    """config.section_help of a section of the whole file."""
    return _section_help(section, Params)


def _dotted(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"distill": {"margin": 0.2}} -> {"distill.margin": 0.2}: an entry overrides single keys, never a whole section."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


