"""The teacher: which open_clip model it is, where its weights come from, and the demo teacher.

`teacher.pretrained` is one of
- `demo`: pretrain `teacher.model` with the CLIP loss on the corpus (the embedded default; no download),
- an open_clip tag (`openai`, `laion2b_s34b_b79k`), an `hf-hub:org/name` id or a `local-dir:` folder,
- a local checkpoint file,
- `""`: random weights (tests and timing only).
`dsmd teacher` resolves it once and records the identity in `teacher_identity.json`; `dsmd extract` loads the
same teacher (`models.load_teacher`: stage one never imports this module or the training loop) and writes
that identity into every Parquet file.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from pipeline import names
from pipeline import atomic, models, training  # the demo teacher is trained by the students' own loop
from pipeline.config import TeacherConfig, TrainConfig

log = logging.getLogger(__name__)

def demo_train_config(cfg: TeacherConfig) -> TrainConfig:
    """The demo teacher is the same CLIP-loss training loop as the baseline student, run on the corpus."""
    return TrainConfig(
        model=cfg.model,
        loss="clip",
        source="corpus",
        manifest=cfg.manifest,
        split=cfg.split,
        out_dir=cfg.out_dir,
        optim=dataclasses.replace(cfg.optim),
    )

def prepare_teacher(cfg: TeacherConfig, resume: bool = False) -> dict:
    """Pretrain the demo teacher (`pretrained: demo`) or check that the configured teacher loads;
    either way write `<out_dir>/teacher_identity.json` and return the identity."""
    out_dir = Path(cfg.out_dir)
    if cfg.pretrained == "demo":
        log.info("pretraining the demo teacher %s on %s", cfg.model, cfg.manifest)
        training.train(demo_train_config(cfg), resume=resume)
    loaded = models.load_teacher(cfg)
    identity = loaded.identity
    atomic.atomic_write_json(identity, out_dir / names.IDENTITY_FILE)
    return identity
