"""`dsmd verify`: the cache proves itself. A seeded random sample of a split's images, captions and stored
views is embedded again by the teacher and compared with the cached rows (cosine >= `min_cosine`; float16
storage alone keeps it above 0.9999). When rows fall below, the report names them, the teacher, and what
differs: the recorded teacher identity (checkpoint, weights, preprocessing, open_clip version) against the
teacher loaded now, and the embedding arrays' sha256 against the split's `_manifest.json` (a corrupted array).
`dsmd extract` runs it on a small sample of every split it writes (`extract.verify_sample`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import models
from pipeline.common import atomic, runtime
from pipeline.common.errors import PipelineError
from pipeline.corpus import augment
from pipeline.features import schema, store
from pipeline.common.config import ExtractConfig, TeacherConfig
from pipeline.models import LoadedModel

log = logging.getLogger(__name__)

WORST_SHOWN = 5


class CacheMismatchError(PipelineError):
    """Cached embeddings that the teacher does not reproduce; the message says which rows and why."""


@dataclass
class SplitCheck:
    """What `verify_split` compared: kind ("image", "text", "view") -> (row ids, cosines)."""

    split: str
    where: str
    min_cosine: float
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    causes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[tuple[str, int, float]]:
        """(kind, row, cosine) of every compared row below min_cosine, worst first."""
        bad = [(kind, int(i), float(c)) for kind, (ids, cos) in self.rows.items() for i, c in zip(ids, cos)
               if not c >= self.min_cosine]  # NaN (a corrupted row) fails too
        return sorted(bad, key=lambda r: (np.nan_to_num(r[2], nan=-2.0), r[0], r[1]))

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> dict:
        return {
            "split": self.split, "ok": self.ok, "min_cosine_required": self.min_cosine,
            "checked": {kind: len(ids) for kind, (ids, _) in self.rows.items()},
            "lowest": {kind: (float(np.min(cos)) if len(cos) else None) for kind, (_, cos) in self.rows.items()},
            "failures": [{"kind": k, "row": r, "cosine": c} for k, r, c in self.failures[:WORST_SHOWN]],
            "causes": self.causes,
        }

    def message(self, teacher_name: str) -> str:
        failures = self.failures
        total = sum(len(ids) for ids, _ in self.rows.values())
        worst = ", ".join(f"{kind} {'row' if kind == 'view' else 'id'} {row}: {cos:.4f}" for kind, row, cos in failures[:WORST_SHOWN])
        causes = "; ".join(self.causes) if self.causes else (
            "the recorded teacher identity and the arrays' sha256 match: the teacher computes differently here "
            "(another device, precision or library build)")
        return (f"{self.where}: the cache does not match teacher {teacher_name!r}: {len(failures)} of {total} sampled "
                f"rows below cosine {self.min_cosine} (worst: {worst}). What differs: {causes}. Re-run `dsmd extract "
                f"--overwrite` with the teacher that should be cached.")


def sample_ids(count: int, sample: int, rng: np.random.Generator) -> np.ndarray:
    """`sample` distinct ids of 0..count-1 (all of them when there are fewer), sorted."""
    return np.sort(rng.choice(count, size=min(sample, count), replace=False)).astype(np.int64)


@torch.inference_mode()
def _encode(encode, inputs: torch.Tensor, device, precision: str, batch_size: int) -> np.ndarray:
    """L2-normalised float32 embeddings, computed as `dsmd extract` computes them."""
    out = []
    for start in range(0, len(inputs), batch_size):
        with runtime.autocast(device, precision):
            emb = encode(inputs[start:start + batch_size].to(device))
        out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out).numpy()


def _cosines(stored: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    stored = stored.astype(np.float32).reshape(len(fresh), -1)
    norms = np.linalg.norm(stored, axis=1) * np.linalg.norm(fresh, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (stored * fresh).sum(axis=1) / norms


def _causes(base: Path, manifest: dict, teacher: LoadedModel) -> list[str]:
    """What can explain a mismatch: a teacher other than the recorded one, an array that changed on disk."""
    causes = []
    recorded = models.comparable_identity(manifest.get("teacher") or {})
    current = models.comparable_identity(teacher.identity)
    for key in sorted(set(recorded) | set(current)):
        if recorded.get(key) != current.get(key):
            causes.append(f"teacher {key}: cached {recorded.get(key)!r}, now {current.get(key)!r}")
    for column, entry in sorted((manifest.get("arrays") or {}).items()):
        path = base / entry["path"]
        if not path.exists():
            causes.append(f"{path.name} is missing")
        elif atomic.sha256_file(path) != entry.get("sha256"):
            causes.append(f"{path.name}: sha256 differs from {schema.SPLIT_MANIFEST} (the array changed after extraction)")
    return causes


def verify_split(teacher: LoadedModel, features_dir: str | Path, split: str, sample: int, seed: int = 0,
                 min_cosine: float = 0.999, device: str | torch.device = "cpu", precision: str = "auto",
                 batch_size: int = 64, added: tuple[str | Path, str] | None = None) -> SplitCheck:
    """Re-embed `sample` seeded random images (with their stored views) and `sample` captions of a split; with
    `added` = (teachers_dir, name), compare with that added teacher's embeddings of the split instead."""
    manifest = store.load_split_manifest(features_dir, split)
    base = store.split_dir(features_dir, split)
    if added is not None:
        base = store.added_teacher_dir(added[0], added[1], split)
        stored_image, stored_text = store.added_teacher_rows(added[0], added[1], features_dir, split)
        recorded = store.added_teacher_manifest(added[0], added[1], split)
    else:
        stored_image = store.embedding_rows(features_dir, split, schema.TEACHER_IMAGE_EMB)
        stored_text = store.embedding_rows(features_dir, split, schema.TEACHER_TEXT_EMB)
        recorded = manifest
    check = SplitCheck(split, str(base), min_cosine)
    device = torch.device(device)
    model = teacher.model.to(device).eval()
    rng = np.random.default_rng([seed, sample])
    image_ids = sample_ids(int(manifest["num_images"]), sample, rng)
    text_ids = sample_ids(int(manifest["num_texts"]), sample, rng)

    images = store.image_bytes(features_dir, split)
    try:
        decoded = [augment.decode_image(images[int(i)]) for i in image_ids]
    except augment.CorruptImageError as exc:
        raise CacheMismatchError(f"{check.where}: a sampled image no longer decodes ({exc})") from None
    pixels = augment.preprocess_batch(teacher.preprocess, decoded) if decoded else None
    if pixels is not None:
        fresh = _encode(model.encode_image, pixels, device, precision, batch_size)
        stored = stored_image[image_ids]
        check.rows["image"] = (image_ids, _cosines(stored, fresh))
    captions = store.take_rows(features_dir, split, schema.TEXTS_PREFIX, text_ids, [schema.CAPTION])[schema.CAPTION].to_pylist()
    if captions:
        fresh = _encode(model.encode_text, teacher.tokenizer(captions), device, precision, batch_size)
        stored = stored_text[text_ids]
        check.rows["text"] = (text_ids, _cosines(stored, fresh))
    views = int(manifest.get("views", 0) or 0)
    if views and decoded:
        params = store.take_rows(features_dir, split, schema.IMAGES_PREFIX, image_ids, [schema.VIEW_PARAMS])[schema.VIEW_PARAMS].to_pylist()
        crops = [augment.apply_view(image, view) for image, per_image in zip(decoded, params) for view in per_image]
        fresh = _encode(model.encode_image, augment.preprocess_batch(teacher.preprocess, crops), device, precision, batch_size)
        stored = (store.embedding_rows(features_dir, split, schema.TEACHER_VIEW_EMB) if added is None else
                  store.added_teacher_view_rows(added[0], added[1], features_dir, split))[image_ids]
        rows = (image_ids[:, None] * views + np.arange(views)).reshape(-1)  # view row = image_id * views + view
        check.rows["view"] = (rows, _cosines(stored, fresh))
    if not check.ok:
        check.causes = _causes(base, recorded, teacher)
    return check


def verify_features(teacher: LoadedModel, features_dir: str | Path, splits: list[str], sample: int, seed: int = 0,
                    min_cosine: float = 0.999, device: str | torch.device = "cpu", precision: str = "auto",
                    batch_size: int = 64, added: tuple[str | Path, str] | None = None) -> dict[str, dict]:
    """verify_split for each split; {split: summary}, or a CacheMismatchError naming every failed split."""
    checks = [verify_split(teacher, features_dir, split, sample, seed, min_cosine, device, precision, batch_size, added)
              for split in splits]
    for check in checks:
        summary = check.summary()
        lowest = {k: v for k, v in summary["lowest"].items() if v is not None}
        log.info("verify %s: %s rows re-embedded, lowest cosine %s: %s", check.split, sum(summary["checked"].values()),
                 ", ".join(f"{k} {v:.5f}" for k, v in lowest.items()), "ok" if check.ok else "MISMATCH")
    failed = [check for check in checks if not check.ok]
    if failed:
        raise CacheMismatchError(" | ".join(check.message(teacher.identity.get("model", "?")) for check in failed))
    return {check.split: check.summary() for check in checks}


def verify(cfg: ExtractConfig, teacher_cfg: TeacherConfig, seed: int = 0, added: str | None = None) -> dict[str, dict]:
    """`dsmd verify`: load the teacher of `teacher_cfg` and check the features of `cfg.splits` in `cfg.out_dir`
    (`cfg.verify_sample` rows of each kind; 0, which turns the check off in extract, samples the default 32), or
    with `added` the embeddings of that added teacher in `cfg.teachers_dir`."""
    runtime.set_threads(cfg.threads)
    device = runtime.resolve_device(cfg.device)
    teacher = models.load_teacher(teacher_cfg, device=device)
    return verify_features(teacher, cfg.out_dir, cfg.splits, cfg.verify_sample or ExtractConfig().verify_sample, seed,
                           cfg.verify_min_cosine, device, cfg.precision, cfg.batch_size,
                           (cfg.teachers_dir, added) if added else None)
