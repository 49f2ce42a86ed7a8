"""What a training run records while it goes: `train_log.jsonl` (one JSON line per logged step, the
record a resume trims and continues) and the same records through DVCLive, so that `dvc exp show` lists
the final training metrics beside the evaluation and `dvc plots show` / `diff` draws the curves.

DVCLive's folder is rebuilt from the (trimmed) log on a resume, so it never holds a step twice.
Also: the periodic validation check, retrieval on the first images of a held-out split.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from pipeline.common import atomic
from pipeline.evaluation.encoding import encode_images, encode_texts
from pipeline.evaluation.retrieval import retrieval_metrics
from pipeline.features import store
from pipeline.models import LoadedModel

log = logging.getLogger(__name__)


class TrainingLog:
    """Appends records to the running log and to DVCLive (when `live_dir` is set); `close` writes
    the summary (`dvclive/metrics.json`)."""

    def __init__(self, running_log: Path, live_dir: str, kept: list[dict]):
        self.path = running_log
        self.file = open(running_log, "a")
        self.live = None
        if live_dir:
            from dvclive import Live  # only the runs that track pay for the import

            # inside `dvc repro` the stage's dvc.yaml declares these files: no own dvc.yaml, no experiment
            self.live = Live(live_dir, resume=False, report=None, save_dvc_exp=False, dvcyaml=False)
            for record in kept:  # a resume: the steps before the checkpoint, once each
                self._to_live(record)
            if kept:
                self.live.make_summary()

    def _to_live(self, record: dict) -> None:
        self.live.step = int(record["step"])
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and np.isfinite(value):
                self.live.log_metric(name, float(value))

    def log(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as exc:  # a full disk mid-run: name the file, keep the checkpoint to resume from
            raise atomic.OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        if self.live is not None:
            self._to_live(record)
            self.live.make_summary()  # metrics.json follows the run, for a user watching it

    def close(self) -> None:
        self.file.close()
        if self.live is not None:
            self.live.end()


class Validation:
    """Retrieval on the first `images` images of a split (and their captions), every `every` steps: a
    run going wrong shows before it ends. Embeddings come from the stored bytes, as in evaluation."""

    def __init__(self, images, captions: list[str], text_to_image: np.ndarray, batch_size: int):
        self.images, self.captions, self.text_to_image, self.batch_size = images, captions, text_to_image, batch_size

    @classmethod
    def from_features(cls, features_dir: str, split: str, images: int, batch_size: int) -> "Validation | None":
        from pipeline.features import schema

        try:
            table = store.image_bytes(features_dir, split, images)
            texts = store.read_texts(features_dir, split, columns=[schema.IMAGE_ID, schema.CAPTION])
        except store.ShardError as exc:
            log.warning("no validation during training: %s", exc)
            return None
        owner = texts[schema.IMAGE_ID].to_numpy()
        keep = owner < len(table)
        return cls(table, [c for c, k in zip(texts[schema.CAPTION].to_pylist(), keep) if k], owner[keep], batch_size)

    def __call__(self, loaded: LoadedModel, device: torch.device) -> dict:
        was_training = loaded.model.training
        image_emb = encode_images(loaded, self.images, self.batch_size, device, "validation", show_progress=False)
        text_emb = encode_texts(loaded, self.captions, self.batch_size, device, "validation", show_progress=False)
        loaded.model.train(was_training)
        metrics = retrieval_metrics(image_emb, text_emb, self.text_to_image, (1, 5, 10))
        return {f"val_{k}": metrics[k] for k in ("rsum", "i2t_r1", "t2i_r1")}
