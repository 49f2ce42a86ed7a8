"""The teacher: which open_clip model it is, where its weights come from, and the demo teacher.

`teacher.pretrained` is one of
- `demo`: pretrain `teacher.model` with the CLIP loss on the corpus (the embedded default; no download),
- an open_clip tag (`openai`, `laion2b_s34b_b79k`), an `hf-hub:org/name` id or a `local-dir:` folder,
- a local checkpoint file,
- `""`: random weights (tests and timing only).
`dsmd teacher` resolves it once and records the identity in `teacher_identity.json`; `dsmd extract` loads the
same teacher and writes that identity into every Parquet file.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from pipeline import models, shards
from pipeline.config import TeacherConfig, TrainConfig

log = logging.getLogger(__name__)


def resolved_source(cfg: TeacherConfig) -> tuple[str, str]:
    """(model name, pretrained value open_clip takes) for the configured teacher."""
    return cfg.model, models.resolve_pretrained(cfg.pretrained, cfg.out_dir)


def load_teacher(cfg: TeacherConfig, device: str | torch.device = "cpu") -> models.LoadedModel:
    model_name, pretrained = resolved_source(cfg)
    loaded = models.load_model(model_name, pretrained, device=device)
    loaded.identity["pretrained_source"] = cfg.pretrained or None
    return loaded


def demo_train_config(cfg: TeacherConfig) -> TrainConfig:
    """The demo teacher is the same CLIP-loss training loop as the baseline student, run on the corpus."""
    return TrainConfig(
        model=cfg.model,
        loss="clip",
        source="corpus",
        manifest=cfg.manifest,
        split="train",
        out_dir=cfg.out_dir,
        optim=dataclasses.replace(cfg.optim),
    )


def prepare_teacher(cfg: TeacherConfig, resume: bool = False) -> dict:
    """Pretrain the demo teacher (`pretrained: demo`) or check that the configured teacher loads;
    either way write `<out_dir>/teacher_identity.json` and return the identity."""
    out_dir = Path(cfg.out_dir)
    if cfg.pretrained == "demo":
        from pipeline import training  # the demo teacher is trained by the student's own loop

        log.info("pretraining the demo teacher %s on %s", cfg.model, cfg.manifest)
        training.train(demo_train_config(cfg), resume=resume)
    loaded = load_teacher(cfg)
    identity = loaded.identity
    shards.atomic_write_json(identity, out_dir / models.IDENTITY_FILE)
    return identity
