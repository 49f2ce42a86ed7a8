"""The training loop: the DSMD student from the cached shards, the CLIP-loss baseline, the demo teacher.

`train(cfg)` reads top to bottom: data -> student (+ projection) -> losses and balancer -> AdamW
and the schedule -> (resume) -> steps -> save. The teacher is never loaded: every teacher signal
comes from the shards written by `dsmd extract` (and `dsmd mine`).

One optimizer step sees a GLOBAL batch of `optim.batch_size` samples, split over the ranks and
over `optim.accum_steps` micro-batches. Contrastive terms need the whole batch, so accumulation
follows open_clip's accum_freq scheme: pass 1 embeds every micro-batch without gradient, pass 2
re-embeds each micro-batch with gradient and computes the loss over the whole global batch with
that micro-batch's features put in place of their cached copies. Summing the gradients of pass 2
gives exactly the gradient of the large-batch loss:

    dL/dtheta = sum_j (dL/df_j)(df_j/dtheta)     (f_j = features of micro-batch j)

Across ranks, features are all-gathered with gradient, so every rank computes the same global
loss; the gather's backward sums the ranks' gradients (world_size x dL/df_local) and DDP's
averaging turns that back into dL/dtheta. logit_scale, which every micro-batch shares, takes its
gradient from the last micro-batch only (the others use a detached copy), else it would count
accum_steps times.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pipeline import models
from pipeline.common import atomic, names, runtime
from pipeline.common.config import ConfigError, teacher_shares, to_dict
from pipeline.common.params import OptimConfig, TrainConfig
from pipeline.common.errors import PipelineError
from pipeline.common.progress import progress
from pipeline.features import store
from pipeline.training import data as data_mod
from pipeline.training.balancer import LossBalancer
from pipeline.training.losses import (ClipLoss, DISTILL_NAMES, DSMDLoss, gather_no_grad, gather_with_grad, LOSS_NAMES, Mined,
                                      PerTeacherDSMDLoss)
from pipeline.training.tracking import TrainingLog, Validation

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
# log_scale is clamped to ln(100) after every step, as in CLIP and open_clip
MAX_LOGIT_SCALE = math.log(100.0)

# Per-sample values that are constants of the loss (gathered without gradient).
MINED_KEYS = data_mod.MINED_KEYS
TARGET_KEYS = (data_mod.IMAGE_ID, data_mod.TEACHER_IMAGE, data_mod.TEACHER_TEXT) + MINED_KEYS


class TrainingError(PipelineError):
    """A run that cannot go on (a diverged loss, a checkpoint from another run)."""


# ---- the student --------------------------------------------------------------------------------

class StudentWithProjection(nn.Module):
    """The open_clip student and, when its width d differs from the teacher's D, a learned linear
    map W (D x d) seen only by the distillation losses:

        image, text       = normalize(f_v), normalize(f_t)            (the student's own space)
        projected_*       = normalize(W f)   (or the normalized f when d == D)
    """

    def __init__(self, model: nn.Module, projection: Optional[nn.Linear]):
        super().__init__()
        self.model = model
        self.projection = projection

    def forward(self, images: Tensor, texts: Tensor, project: bool = True) -> dict[str, Tensor]:
        image = self.model.encode_image(images)
        text = self.model.encode_text(texts)
        out = {
            "image": F.normalize(image, dim=-1),
            "text": F.normalize(text, dim=-1),
            "logit_scale": self.model.logit_scale.exp(),
        }
        if project:
            if self.projection is None:
                out["projected_image"], out["projected_text"] = out["image"], out["text"]
            else:
                out["projected_image"] = F.normalize(self.projection(image), dim=-1)
                out["projected_text"] = F.normalize(self.projection(text), dim=-1)
        return out


def build_student(cfg: TrainConfig, teacher_dim: Optional[int], device: torch.device) -> tuple[models.LoadedModel, StudentWithProjection]:
    """The student from `cfg.model` / `cfg.pretrained` (seeded, so every rank and every resume
    starts from the same weights) with a projection when distilling into a different width."""
    runtime.seed_everything(cfg.optim.seed if cfg.optim.init_seed < 0 else cfg.optim.init_seed)
    loaded = models.load_model(cfg.model, cfg.pretrained, device="cpu", image_mean=cfg.image_mean, image_std=cfg.image_std,
                               force_patch_dropout=cfg.force_patch_dropout)
    if cfg.init_logit_scale > 0:  # where CLIP from scratch on small batches may stall: a knob to tune
        with torch.no_grad():
            loaded.model.logit_scale.fill_(math.log(cfg.init_logit_scale))
    projection = None
    distills = cfg.loss == "dsmd" and any(getattr(cfg.distill, n) for n in LOSS_NAMES if n != "task")
    if distills and teacher_dim is not None and teacher_dim != loaded.embed_dim:
        projection = nn.Linear(loaded.embed_dim, teacher_dim, bias=False)
        if cfg.projection_init == "orthogonal":  # orthonormal columns at the start: projected cosines = own cosines
            nn.init.orthogonal_(projection.weight)
    net = StudentWithProjection(loaded.model, projection).to(device)
    net.train()
    return loaded, net


def build_optimizer(net: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW; as open_clip, no weight decay on gains and biases (1-d tensors, norms), logit_scale
    and embeddings (token / positional / class)."""

    def no_decay(name: str, p: Tensor) -> bool:
        return p.ndim < 2 or "bias" in name or "ln" in name or "norm" in name or "logit_scale" in name or "embedding" in name

    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": optim.weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(0.9, 0.98), eps=1e-6)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine to 0 at `total_steps`:

        f(s) = (s + 1) / W                                     for s < W
        f(s) = (1 + cos(pi * (s - W) / (T - W))) / 2           otherwise
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / decay_steps)))


def create_losses(cfg: TrainConfig, teacher_dim: Optional[int], total_steps: int,
                  teacher_widths: Optional[list[int]] = None) -> tuple[Optional[DSMDLoss], Optional[ClipLoss], LossBalancer]:
    """The one place the config meets the losses (as open_clip's `create_loss(args)`): the distillation terms, the
    task term and the balancer, built from plain arguments."""
    if cfg.loss != "dsmd":
        return None, ClipLoss(), LossBalancer(["task"], mode="uniform")
    distill = cfg.distill
    if teacher_dim is None:
        raise ConfigError("train.loss dsmd needs the teacher's embedding width (from the features)")
    names = [n for n in LOSS_NAMES if getattr(distill, n)]
    if not names:
        raise ConfigError(f"train.distill: every loss term is switched off; enable at least one of {LOSS_NAMES}")
    terms = [n for n in names if n != "task"]
    common = dict(temperature=distill.temperature, queue_size=distill.queue_size, margin=distill.margin,
                  margin_mode=distill.margin_mode, affinity_temperature=distill.affinity_temperature)
    if not terms:
        dsmd_loss = None
    elif cfg.teachers and cfg.teachers_target == "each":  # every term against each teacher apart
        if teacher_widths is None or len(teacher_widths) != len(cfg.teachers) or sum(teacher_widths) != teacher_dim:
            raise ConfigError(f"train.teachers_target each: the data's teacher widths {teacher_widths} do not match "
                              f"train.teachers {list(cfg.teachers)} (width {teacher_dim})")
        dsmd_loss = PerTeacherDSMDLoss(terms, teacher_widths, [s.weight for s in cfg.teachers.values()],
                                       [s.temperature for s in cfg.teachers.values()], **common)
    else:
        dsmd_loss = DSMDLoss(terms, teacher_dim, **common)
    b = distill.balancer
    try:
        balancer = LossBalancer(names, mode=b.mode, temperature=b.temperature, fixed_weights=b.weights,
                                max_weight=b.max_weight, task_share=b.task_share, calibration_steps=b.calibration_steps,
                                window=b.window, task_share_end=b.task_share_end, total_steps=total_steps)
    except ValueError as exc:  # the balancer checks its own arguments; name where they came from
        raise ConfigError(f"train.distill.balancer: {exc}") from None
    return dsmd_loss, ClipLoss() if distill.task else None, balancer


def build_context(cfg: TrainConfig, teacher_dim: Optional[int], total_steps: int, device: torch.device, distributed: bool = False,
                  teacher_widths: Optional[list[int]] = None) -> tuple[models.LoadedModel, StepContext]:
    """The student (+ projection), the losses and balancer, AdamW and its schedule, for `cfg`."""
    optim = cfg.optim
    loaded, net = build_student(cfg, teacher_dim, device)
    dsmd_loss, clip_loss, balancer = create_losses(cfg, teacher_dim, total_steps, teacher_widths)
    if dsmd_loss is not None:
        dsmd_loss = dsmd_loss.to(device)
    if clip_loss is None:
        net.model.logit_scale.requires_grad_(False)  # nothing uses it; DDP wants every parameter used
    optimizer = build_optimizer(net, optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, optim.warmup_steps))
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and optim.precision == "fp16" else None
    train_net: nn.Module = net
    if distributed:
        train_net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    ctx = StepContext(
        net=train_net, dsmd_loss=dsmd_loss, clip_loss=clip_loss, balancer=balancer, optimizer=optimizer,
        scheduler=scheduler, scaler=scaler, device=device, precision=optim.precision,
        grad_clip=optim.grad_clip, distributed=distributed,
    )
    return loaded, ctx


# ---- one optimizer step -------------------------------------------------------------------------

@dataclass
class StepContext:
    """Everything an optimizer step touches."""

    net: nn.Module  # StudentWithProjection, possibly wrapped in DistributedDataParallel
    dsmd_loss: Optional[DSMDLoss]  # the distillation terms
    clip_loss: Optional[ClipLoss]  # the task term on the student's own embeddings
    balancer: LossBalancer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: Optional[torch.amp.GradScaler]
    device: torch.device
    precision: str = "auto"
    grad_clip: float = 0.0
    distributed: bool = False

    @property
    def student(self) -> StudentWithProjection:
        return self.net.module if hasattr(self.net, "module") else self.net


def _global_order(gathered: list[Tensor]) -> Tensor:
    """The global batch in sampler order (rank-major, then micro-batch) from per-micro-batch
    gathers (each rank-major): the same order as one process, which the FIFO queue depends on."""
    world_size = runtime.world_size()
    pieces = [g.chunk(world_size) for g in gathered]
    return torch.cat([pieces[j][r] for r in range(world_size) for j in range(len(gathered))])


def _gather_target(micro_batches: list[dict], key: str, device: torch.device) -> Tensor:
    """One per-sample constant (teacher embeddings, ids) of the whole global batch."""
    return _global_order([gather_no_grad(mb[key].to(device, non_blocking=True)) for mb in micro_batches])


def mined_of(targets: dict[str, Tensor]) -> Optional[dict[str, Mined]]:
    """The batch's mined negatives as one structure: direction -> Mined (None without any)."""
    found = {direction: Mined(targets[emb], targets[owner]) for direction, (emb, owner) in data_mod.MINED.items()
             if emb in targets}
    return found or None


def compute_losses(ctx: StepContext, features: dict[str, Tensor], targets: dict[str, Tensor], logit_scale: Tensor) -> dict[str, Tensor]:
    """The enabled raw terms over the global batch, in LOSS_NAMES order."""
    losses: dict[str, Tensor] = {}
    if ctx.dsmd_loss is not None:  # the model's output and the batch's targets, by their one name each
        plain = {k: v for k, v in targets.items() if k not in MINED_KEYS}
        losses.update(ctx.dsmd_loss(**features, **plain, mined=mined_of(targets)))
    if ctx.clip_loss is not None:
        losses["task"] = ctx.clip_loss(features["image"], features["text"], logit_scale, image_ids=targets[data_mod.IMAGE_ID])
    return {name: losses[name] for name in LOSS_NAMES if name in losses}


def optimizer_step(ctx: StepContext, micro_batches: list[dict]) -> dict[str, float]:
    """One AdamW step on the global batch made of this rank's `micro_batches` (and the other
    ranks'); returns the raw losses, the weights and a few diagnostics as floats."""
    device, student = ctx.device, ctx.student
    distill = ctx.dsmd_loss is not None
    feature_keys = ("image", "text") + (("projected_image", "projected_text") if distill else ())
    targets = {k: _gather_target(micro_batches, k, device) for k in TARGET_KEYS if k in micro_batches[0]}
    inputs = [(mb[data_mod.IMAGE].to(device, non_blocking=True), mb[data_mod.TEXT].to(device, non_blocking=True)) for mb in micro_batches]

    # pass 1: every micro-batch's features without gradient (the rest of the batch for pass 2)
    cached: list[dict[str, Tensor]] = []
    if len(micro_batches) > 1:
        with torch.no_grad(), runtime.autocast(device, ctx.precision):
            for images, texts in inputs:
                out = student(images, texts, project=distill)
                cached.append({k: gather_no_grad(out[k]) for k in feature_keys})

    # pass 2: each micro-batch with gradient, the loss over the whole global batch
    ctx.optimizer.zero_grad(set_to_none=True)
    last = len(inputs) - 1
    for j, (images, texts) in enumerate(inputs):
        sync = contextlib.nullcontext() if (j == last or not ctx.distributed) else ctx.net.no_sync()
        with sync:
            with runtime.autocast(device, ctx.precision):
                out = ctx.net(images, texts, project=distill)
                features = {
                    k: _global_order([c[k] for c in cached[:j]] + [gather_with_grad(out[k])] + [c[k] for c in cached[j + 1 :]])
                    for k in feature_keys
                }
                logit_scale = out["logit_scale"] if j == last else out["logit_scale"].detach()
                losses = compute_losses(ctx, features, targets, logit_scale)
                total, weights = ctx.balancer(losses, advance=False)
            if not torch.isfinite(total):
                raise TrainingError(
                    f"the loss is not finite ({ {k: float(v) for k, v in losses.items()} }); lower optim.lr "
                    f"or check the features"
                )
            if ctx.scaler is not None:
                ctx.scaler.scale(total).backward()
            else:
                total.backward()

    if ctx.scaler is not None:
        ctx.scaler.unscale_(ctx.optimizer)
    params = [p for group in ctx.optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, ctx.grad_clip if ctx.grad_clip > 0 else float("inf"))
    if ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        ctx.optimizer.step()
    ctx.scheduler.step()
    with torch.no_grad():
        student.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    ctx.balancer.step_end(losses)
    if distill and ctx.dsmd_loss.queue is not None:
        # the global batch's teacher embeddings, identical on every rank, so every queue is identical
        ctx.dsmd_loss.enqueue(targets[data_mod.TEACHER_IMAGE], targets[data_mod.TEACHER_TEXT], targets[data_mod.IMAGE_ID])

    result = {f"loss_{k}": float(v.detach()) for k, v in losses.items()}
    result["loss_total"] = float(total.detach())
    result.update({f"weight_{k}": float(w) for k, w in weights.items()})
    result["grad_norm"] = float(grad_norm)
    result["logit_scale"] = float(student.model.logit_scale.detach().exp())
    if distill:
        with torch.no_grad():
            result["cosine_image"] = float((features["projected_image"] * targets[data_mod.TEACHER_IMAGE]).sum(-1).mean())
            result["cosine_text"] = float((features["projected_text"] * targets[data_mod.TEACHER_TEXT]).sum(-1).mean())
    return result


# ---- checkpoints and logs -----------------------------------------------------------------------

def _rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors / plain values (loadable with weights_only)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, ctx: StepContext, step: int, extra: dict) -> None:
    """Everything a resume needs, as tensors and plain containers (torch.load(weights_only=True))."""
    student = ctx.student
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "model": student.model.state_dict(),
        "projection": None if student.projection is None else student.projection.state_dict(),
        "optimizer": ctx.optimizer.state_dict(),
        "scheduler": ctx.scheduler.state_dict(),
        "scaler": None if ctx.scaler is None else ctx.scaler.state_dict(),
        "balancer": ctx.balancer.state_dict(),
        "queue": None if ctx.dsmd_loss is None or ctx.dsmd_loss.queue is None else ctx.dsmd_loss.queue.state_dict(),
        "rng": _rng_state(),
        **extra,
    }
    atomic.atomic_torch_save(state, path)


def load_checkpoint(path: Path, ctx: StepContext, expect: dict) -> dict:
    """Restore `ctx` from `path`; refuses a checkpoint of a different run (model, loss, data, batch)."""
    try:
        state = torch.load(path, map_location=ctx.device, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise TrainingError(f"{path}: cannot be loaded as a training checkpoint ({exc})") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: checkpoint format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    different = {k: (state.get("run", {}).get(k), v) for k, v in expect.items() if state.get("run", {}).get(k) != v}
    if different:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in different.items())
        raise TrainingError(f"{path} belongs to a different run ({details}); resume without it (no --resume) or fix the options")
    student = ctx.student
    student.model.load_state_dict(state["model"])
    if student.projection is not None:
        student.projection.load_state_dict(state["projection"])
    ctx.optimizer.load_state_dict(state["optimizer"])
    ctx.scheduler.load_state_dict(state["scheduler"])
    if ctx.scaler is not None and state.get("scaler") is not None:
        ctx.scaler.load_state_dict(state["scaler"])
    ctx.balancer.load_state_dict(state["balancer"])
    if ctx.dsmd_loss is not None and ctx.dsmd_loss.queue is not None:
        ctx.dsmd_loss.queue.load_state_dict(state["queue"])
    _set_rng_state(state["rng"])
    return state


def _trim_log(path: Path, last_step: int, out: Path) -> list[dict]:
    """Write to `out` the records of `path` (if any) of steps <= last_step, and return them: a resumed
    run continues the log without duplicates (a fresh run, last_step 0, starts it empty)."""
    kept = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            record = json.loads(line)
            if record["step"] <= last_step:
                kept.append(record)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a kill
    atomic.atomic_write_text("".join(json.dumps(k) + "\n" for k in kept), out)
    return kept


# ---- the loop -----------------------------------------------------------------------------------

def _check_config(cfg: TrainConfig) -> None:
    """What relates several keys (each key's own range is checked by the config itself)."""
    if cfg.loss == "dsmd" and cfg.source != "shards":
        raise ConfigError("train.loss dsmd needs train.source shards (the teacher embeddings live there)")
    if cfg.batching == "hard-negative-aware" and cfg.source != "shards":
        raise ConfigError("train.batching hard-negative-aware needs train.source shards (and mined negatives)")
    if cfg.optim.max_steps == 0 and not cfg.optim.epochs > 0:
        raise ConfigError(f"optim.epochs must be > 0 (or optim.max_steps > 0), got epochs {cfg.optim.epochs}, "
                          f"max_steps {cfg.optim.max_steps}")
    for key in ("image_mean", "image_std"):
        value = getattr(cfg, key)
        if value and (len(value) != 3 or (key == "image_std" and min(value) <= 0)):
            raise ConfigError(f"train.{key} must be [] or 3 numbers (R, G, B){' > 0' if key == 'image_std' else ''}, got {value}")
    if bool(cfg.image_mean) != bool(cfg.image_std):
        raise ConfigError("train.image_mean and train.image_std go together: set both or neither")


def train(cfg: TrainConfig, resume: bool = False, world: Optional[data_mod.TrainingData] = None) -> dict:
    """Train the student described by `cfg`; returns the run summary (also in train_summary.json).

    loss dsmd: the DSMD terms on cached teacher embeddings plus the CLIP task loss.
    loss clip: the CLIP loss alone, from the shards (teacher embeddings ignored), the corpus, or (source
    world) `world`, the synthetic world rendered on the fly (`pretrain.load_world_data`).
    """
    _check_config(cfg)
    if (cfg.source == "world") != (world is not None):
        raise ConfigError("train.source world is the demo teacher's pretraining (`dsmd pretrain`), with its world data")
    owns_process_group = not (dist.is_available() and dist.is_initialized())
    info = runtime.init_distributed(cfg.optim.device)
    try:
        return _train(cfg, resume, info, world)
    finally:
        if owns_process_group and info.distributed:
            runtime.shutdown_distributed()


@dataclass
class _Inputs:
    """Everything training reads from the shards (or the corpus): the teacher itself is never loaded."""

    data: data_mod.TrainingData
    fingerprint: Optional[str]  # of the features split, recorded in checkpoints
    teacher_dim: Optional[int]  # None for the CLIP-only loss
    image_ids: "np.ndarray | data_mod.ImageRange"  # the images trained on
    negatives: Optional[data_mod.MinedNegatives]  # for the hard-negative term
    i2i: Optional[np.ndarray]  # for hard-negative-aware batching
    steps: int


def _load_inputs(cfg: TrainConfig, world: Optional[data_mod.TrainingData] = None) -> _Inputs:
    distill = cfg.loss == "dsmd"
    if world is not None:
        data, fingerprint = world, None
    elif cfg.source == "shards":
        stream = cfg.data_loading == "stream" or (
            cfg.data_loading == "auto" and data_mod.embeddings_bytes(cfg.features_dir, cfg.split) > cfg.stream_above_mb * 2**20)
        log.info("teacher embeddings of split %s: %s", cfg.split, "read per batch (streaming)" if stream else "in memory")
        data = data_mod.load_shards_data(cfg.features_dir, cfg.split, with_teacher=distill, with_views=cfg.use_views,
                                         stream=stream, teachers=teacher_shares(cfg.teachers), teachers_dir=cfg.teachers_dir,
                                         teachers_scaled=cfg.teachers_target == "ensemble")
        fingerprint = store.features_fingerprint(cfg.features_dir, cfg.split)
    else:
        data = data_mod.load_corpus_data(cfg.manifest, cfg.split)
        fingerprint = None
    wants_mined = distill and cfg.distill.hard_negative and cfg.distill.hard_negatives > 0
    wants_grouping = cfg.batching == "hard-negative-aware"
    negatives = None
    if wants_mined:  # read per batch
        negatives = data_mod.load_negatives(cfg.negatives_dir, cfg.split, data, cfg.distill.hard_negatives, cfg.features_dir)
    mined_i2i = (data_mod.read_i2i(cfg.negatives_dir, cfg.split, data, cfg.features_dir, max(0, cfg.batch_neighbours))
                 if wants_grouping else None)  # an epoch's order needs every image's neighbours at once
    image_ids = data.trainable_image_ids()
    if len(image_ids) < data.num_images:
        log.warning("%s: %d image(s) without a caption are not trained on", data.source, data.num_images - len(image_ids))
    if 0 < cfg.max_images < len(image_ids):
        image_ids = image_ids[: cfg.max_images]
        log.info("train.max_images: training on the first %d images of %s", len(image_ids), data.source)
        if negatives is not None:  # nothing outside the subset may reach the student, not even as a negative
            negatives = data_mod.restrict_negatives(negatives, image_ids, data.num_images)
    return _Inputs(
        data=data, fingerprint=fingerprint, teacher_dim=data.embedding_dim if distill else None, image_ids=image_ids,
        negatives=negatives, i2i=mined_i2i,
        steps=data_mod.total_steps(len(image_ids), cfg.optim.batch_size, cfg.optim.epochs, cfg.optim.max_steps),
    )


def _run_identity(cfg: TrainConfig, inputs: _Inputs, ctx: StepContext) -> dict:
    """What a checkpoint must match to be resumed."""
    ensemble = ({"teachers": teacher_shares(cfg.teachers), "teachers_target": cfg.teachers_target}
                if cfg.teachers and cfg.loss == "dsmd" else {})
    return {**ensemble,
        "model": cfg.model, "loss": cfg.loss, "source": cfg.source, "split": cfg.split, "batching": cfg.batching,
        "batch_neighbours": cfg.batch_neighbours, "max_images": cfg.max_images, "projection_init": cfg.projection_init,
        "image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std),
        "batch_size": cfg.optim.batch_size, "seed": cfg.optim.seed, "init_seed": cfg.optim.init_seed, "use_views": cfg.use_views,
        "features_fingerprint": inputs.fingerprint,
        "loss_terms": list(ctx.balancer.names),
    }


def _start(cfg: TrainConfig, inputs: _Inputs, ctx: StepContext, identity: dict, resume: bool, device: torch.device) -> int:
    """The step to start from: a resumed checkpoint's, or 0 with the queue full of real cached teacher embeddings."""
    checkpoint_path = Path(cfg.out_dir) / names.CHECKPOINT_FILE
    if resume and checkpoint_path.exists():
        start_step = int(load_checkpoint(checkpoint_path, ctx, identity)["step"])
        log.info("resuming %s from step %d of %d", cfg.out_dir, start_step, inputs.steps)
        return start_step
    if resume:
        log.info("--resume: no %s yet, starting from scratch", checkpoint_path)
    if ctx.dsmd_loss is not None and ctx.dsmd_loss.queue is not None:
        _prefill_queue(ctx.dsmd_loss, inputs.data, inputs.image_ids, cfg.optim.seed, device)
    return 0


def _batches(cfg: TrainConfig, inputs: _Inputs, loaded, start_step: int, info: runtime.DistInfo, device: torch.device):
    """(sampler, loader): global batches as a pure function of (seed, epoch), this rank's share of each."""
    optim = cfg.optim
    dataset = data_mod.TrainingDataset(
        inputs.data, loaded.preprocess, loaded.tokenizer, seed=optim.seed, use_views=cfg.use_views,
        negatives=inputs.negatives,
    )
    sampler = data_mod.GlobalBatchSampler(
        inputs.image_ids, optim.batch_size, inputs.steps, seed=optim.seed, batching=cfg.batching, i2i=inputs.i2i,
        start_step=start_step, rank=info.rank, world_size=info.world_size, accum_steps=optim.accum_steps,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=optim.num_workers, collate_fn=data_mod.keep_batch,
        pin_memory=device.type == "cuda", worker_init_fn=runtime.die_with_parent(),
    )
    return sampler, loader


def _train(cfg: TrainConfig, resume: bool, info: runtime.DistInfo, world: Optional[data_mod.TrainingData]) -> dict:
    started = time.perf_counter()
    optim = cfg.optim
    device = runtime.device_for(info, optim.device)
    runtime.set_threads(optim.threads)
    out_dir = Path(cfg.out_dir)
    if info.is_main:
        atomic.prepare_output_dir(out_dir)  # writable, no temporaries of killed runs

    # inputs, then the student, its projection, the losses, AdamW and the schedule
    inputs = _load_inputs(cfg, world)
    loaded, ctx = build_context(cfg, inputs.teacher_dim, inputs.steps, device, info.distributed, inputs.data.teacher_widths)
    if info.is_main:  # a checkpoint holds the weights and AdamW's two moments; the student its weights
        weight_bytes = sum(p.numel() * p.element_size() for group in ctx.optimizer.param_groups for p in group["params"])
        atomic.check_free_space(out_dir, 5 * weight_bytes + (32 << 20))

    # start or resume; only once every option is checked (the sampler refuses a batch larger than the
    # data) is a previous run's log replaced: it grows as RUNNING_LOG_FILE until the run ends
    identity = _run_identity(cfg, inputs, ctx)
    start_step = _start(cfg, inputs, ctx, identity, resume, device)
    sampler, loader = _batches(cfg, inputs, loaded, start_step, info, device)
    running_log, log_path = out_dir / names.RUNNING_LOG_FILE, out_dir / names.TRAIN_LOG_FILE
    kept = _trim_log(running_log if running_log.exists() else log_path, start_step, running_log) if info.is_main else []
    validation = None
    if info.is_main and cfg.val_every > 0 and cfg.source == "shards":
        validation = Validation.from_features(cfg.features_dir, cfg.val_split, cfg.val_images, 256)
    log.info(
        "training %s (%s loss, %s) on %d images of %s: %d steps of %d, %d rank(s) x %d micro-batch(es)",
        cfg.model, cfg.loss, cfg.source, len(inputs.image_ids), inputs.data.source, inputs.steps, optim.batch_size,
        info.world_size, optim.accum_steps,
    )

    def checkpoint(step: int) -> None:
        if info.is_main:
            extra = {
                "run": identity, "epoch": step // sampler.batches_per_epoch,
                "step_in_epoch": step % sampler.batches_per_epoch, "total_steps": inputs.steps,
                "world_size": info.world_size, "config": to_dict(cfg),
            }
            save_checkpoint(out_dir / names.CHECKPOINT_FILE, ctx, step, extra)
        runtime.barrier(info)

    # the loop
    steps, samples_per_epoch = inputs.steps, sampler.batches_per_epoch * optim.batch_size
    last: dict[str, float] = {}
    batches = iter(loader)
    bar = progress(steps, f"train {cfg.loss}", "step", initial=start_step, enabled=info.is_main)
    run_started = window_started = time.perf_counter()
    window_steps = 0
    live_dir = str(out_dir / names.DVCLIVE_DIR) if cfg.live_dir == "auto" else cfg.live_dir
    run_log = TrainingLog(running_log, live_dir, kept) if info.is_main else None
    with bar, contextlib.closing(run_log) if run_log else contextlib.nullcontext():
        for step in range(start_step, steps):
            micro_batches = [next(batches) for _ in range(optim.accum_steps)]
            lr = ctx.optimizer.param_groups[0]["lr"]
            last = optimizer_step(ctx, micro_batches)
            done, window_steps = step + 1, window_steps + 1
            samples_per_s = window_steps * optim.batch_size / max(time.perf_counter() - window_started, 1e-9)
            bar.set_postfix(loss=f"{last['loss_total']:.4f}", samples_per_s=f"{samples_per_s:.0f}")
            bar.update(1)
            validate = validation is not None and (done % cfg.val_every == 0 or done == steps)
            if info.is_main and (done % max(1, optim.log_every) == 0 or done == steps or validate):
                record = {"step": done, "epoch": done * optim.batch_size / samples_per_epoch, "lr": lr,
                          "samples_per_s": samples_per_s, **last}
                if validate:
                    record.update(validation(loaded, device))
                    bar.set_postfix(loss=f"{last['loss_total']:.4f}", val_rsum=f"{record['val_rsum']:.1f}")
                run_log.log(record)
                window_started, window_steps = time.perf_counter(), 0
            if optim.checkpoint_every > 0 and done % optim.checkpoint_every == 0 and done < steps:
                checkpoint(done)
    run_seconds = time.perf_counter() - run_started

    # outputs: the resumable checkpoint, the open_clip student, the summary, the log
    checkpoint(steps)
    summary = {
        "steps": steps,
        "resumed_from_step": start_step if start_step else None,
        "epochs": steps * optim.batch_size / samples_per_epoch,
        "final": last,
        "wall_time_s": time.perf_counter() - started,
        "train_time_s": run_seconds,
        "samples_per_s": (steps - start_step) * optim.batch_size / max(run_seconds, 1e-9),
        "world_size": info.world_size,
        "num_images": int(len(inputs.image_ids)),
        "teacher_dim": inputs.teacher_dim,
        "student_dim": loaded.embed_dim,
        "projection": ctx.student.projection is not None,
        "skipped": inputs.data.skipped,
        "student": str(out_dir / names.WEIGHTS_FILE),
        "config": to_dict(cfg),
    }
    if info.is_main:
        models.save_open_clip_dir(ctx.student.model, cfg.model, out_dir)
        atomic.atomic_write_json(summary, out_dir / names.TRAIN_SUMMARY_FILE)
        running_log.replace(log_path)
    runtime.barrier(info)
    return summary


def _prefill_queue(dsmd_loss: DSMDLoss, data: data_mod.TrainingData, image_ids, seed: int, device: torch.device) -> None:
    """Fill the teacher queue with a seeded random sample of cached (image, caption) embeddings,
    so the first steps already see real negatives (the authors start from random vectors)."""
    rng = np.random.default_rng((seed, 2))
    chosen = rng.permutation(np.asarray(image_ids))[: dsmd_loss.queue.size].astype(np.int64)
    text_ids = np.array([data.captions_of(i)[0] for i in chosen], dtype=np.int64)
    dsmd_loss.prefill(
        torch.from_numpy(data.teacher_image[chosen].astype(np.float32)).to(device),
        torch.from_numpy(data.teacher_text[text_ids].astype(np.float32)).to(device),
        torch.from_numpy(chosen).to(device),
    )
