"""Zero-shot classification, as CLIP_benchmark scores it, from cached teacher features.

A task (CLIP_benchmark's WebDataset layout, declared under `classification:` in the corpus manifest)
is labelled images, class names and prompt templates. `dsmd extract` stores the teacher's embedding of
every image and of every prompt (`template.format(c=classname)`) in `features/zeroshot/<task>/`;
evaluation builds each model's classifier from its own prompt embeddings and scores its own image
embeddings, so the teacher is never loaded again. Definitions follow CLIP_benchmark
(`clip_benchmark.metrics.zeroshot_classification`):
- class embedding = L2-normalise(mean over templates of the L2-normalised prompt embeddings);
- acc1 / acc5 = share of images whose label is among the 1 / 5 best-scoring classes (acc5 is None
  with fewer than 5 classes, where CLIP_benchmark reports NaN);
- mean_per_class_recall = mean over the classes present of the share of their images classified right
  (sklearn's balanced accuracy, which CLIP_benchmark uses).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.features import schema, store
from pipeline.features.schema import list_tasks, prompts_for, task_dir  # the layout, shared with extraction (stage one)
from pipeline.evaluation.encoding import encode_images, encode_texts
from pipeline.models import LoadedModel

log = logging.getLogger(__name__)


def class_embeddings(prompt_emb: np.ndarray, class_index: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, D): per class, the normalised mean of its normalised prompt embeddings."""
    prompt_emb = prompt_emb / np.linalg.norm(prompt_emb, axis=1, keepdims=True)
    sums = np.zeros((num_classes, prompt_emb.shape[1]), np.float64)
    np.add.at(sums, class_index, prompt_emb)
    return (sums / np.linalg.norm(sums, axis=1, keepdims=True)).astype(np.float32)


def classification_metrics(image_emb: np.ndarray, labels: np.ndarray, class_emb: np.ndarray) -> dict:
    """acc1, acc5 and mean_per_class_recall (fractions, CLIP_benchmark's keys) of cosine scoring."""
    scores = torch.from_numpy(image_emb.astype(np.float32)) @ torch.from_numpy(class_emb).T
    labels = np.asarray(labels)
    k = min(5, class_emb.shape[0])
    top = scores.topk(k, dim=1).indices.numpy()
    hits = top == labels[:, None]
    predicted = top[:, 0]
    recalls = [float(np.mean(predicted[labels == c] == c)) for c in np.unique(labels)]
    return {
        "acc1": float(hits[:, 0].mean()),
        "acc5": float(hits.any(axis=1).mean()) if class_emb.shape[0] >= 5 else None,
        "mean_per_class_recall": float(np.mean(recalls)),
        "num_images": int(len(labels)),
        "num_classes": int(class_emb.shape[0]),
    }


@dataclass
class Task:
    """A zero-shot task as `dsmd extract` wrote it: read once, scored for the teacher and every student."""

    name: str
    folder: Path
    num_classes: int
    images: pa.Table  # images.parquet: image bytes, label, teacher_image_emb
    prompts: pa.Table  # prompts.parquet: class_index, prompt, teacher_text_emb


def load_task(features_dir: str | Path, task: str) -> Task:
    folder = task_dir(features_dir, task)
    marker = folder / schema.SPLIT_MANIFEST
    if not marker.exists():
        raise store.ShardError(f"{marker} not found: run `dsmd extract` (zero-shot task {task!r})")
    manifest = json.loads(marker.read_text())
    return Task(task, folder, len(manifest["classnames"]), pq.read_table(folder / schema.ZEROSHOT_IMAGES_FILE),
                pq.read_table(folder / schema.ZEROSHOT_PROMPTS_FILE))


def teacher_task_metrics(task: Task) -> dict:
    """The teacher's zero-shot metrics on `task`, from its cached embeddings."""
    class_emb = class_embeddings(schema.embeddings_to_numpy(task.prompts[schema.TEACHER_TEXT_EMB]),
                                 task.prompts[schema.CLASS_INDEX].to_numpy(), task.num_classes)
    return classification_metrics(schema.embeddings_to_numpy(task.images[schema.TEACHER_IMAGE_EMB]),
                                  task.images[schema.LABEL].to_numpy(), class_emb)


def student_task_metrics(loaded: LoadedModel, task: Task, batch_size: int, device) -> dict:
    """A student's zero-shot metrics on `task`: its own embeddings of the stored images and prompts."""
    device = torch.device(device)
    image_emb = encode_images(loaded, task.images[schema.IMAGE_BYTES].to_pylist(), batch_size, device, str(task.folder))
    prompt_emb = encode_texts(loaded, task.prompts[schema.PROMPT].to_pylist(), batch_size, device, str(task.folder))
    class_emb = class_embeddings(prompt_emb, task.prompts[schema.CLASS_INDEX].to_numpy(), task.num_classes)
    return classification_metrics(image_emb, task.images[schema.LABEL].to_numpy(), class_emb)
