"""The teacher: which open_clip model it is and where its weights come from (stage one).

`teacher.pretrained` is one of
- `demo`: the demo teacher's weights shipped in `pipeline/pretrained/<model>/` (made once by `dsmd pretrain`),
  resolved like any downloaded open_clip tag,
- an open_clip tag (`openai`, `laion2b_s34b_b79k`), an `hf-hub:org/name` id or a `local-dir:` folder,
- a local checkpoint file,
- `""`: random weights (tests and timing only).
`dsmd teacher` resolves it once and records the identity in `teacher_identity.json`; `dsmd extract` loads the
same teacher (`models.load_teacher`) and writes that identity into every Parquet file. Nothing here trains.
"""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline import models
from pipeline.common import atomic, names
from pipeline.common.config import TeacherConfig

log = logging.getLogger(__name__)


def prepare_teacher(cfg: TeacherConfig) -> dict:
    """Check that the configured teacher loads; write `<out_dir>/teacher_identity.json` and return the identity."""
    loaded = models.load_teacher(cfg)
    identity = loaded.identity
    atomic.atomic_write_json(identity, Path(cfg.out_dir) / names.IDENTITY_FILE)
    return identity
