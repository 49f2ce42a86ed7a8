"""`dsmd evaluate`: retrieval quality and encoder cost of the teacher against the students.

Quality follows the standard multi-caption protocol (Flickr30k / COCO): image -> text is a hit at K
if any of the image's captions is among the K best-scoring texts; text -> image if its own image is.
Scores are cosine similarities of L2-normalised embeddings, computed by chunks of query rows so that
COCO's 5k x 25k matrix never exists at once.

The teacher's quality comes from its cached embeddings (no teacher forward); the students encode
the stored image bytes and captions with their own preprocessing and tokenizer. Cost (parameters,
batch-1 latency, large-batch throughput) is measured for teacher and students in the same process,
with the same thread count, interleaving the models so that machine noise hits all of them alike.
"""
from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

import numpy as np
import torch

from pipeline.common import atomic, names, runtime
from pipeline.common.config import ConfigError
from pipeline.common.params import EvaluateConfig
from pipeline.common.errors import PipelineError
from pipeline.evaluation import zeroshot
from pipeline.features import store
from pipeline.evaluation.encoding import encode_split  # noqa: F401  (re-exported: evaluation.encode_split)
from pipeline.evaluation.cost import compare_encoder_costs, encoder_cost, parameter_counts  # noqa: F401  (re-exported)
from pipeline.evaluation.plots import TEACHER, plot_quality_vs_time, plot_training_curves, quality_figure, read_train_log  # noqa: F401
from pipeline.evaluation.retrieval import _check_ks, metrics_from_ranks, retrieval_metrics, retrieval_ranks  # noqa: F401
from pipeline.evaluation.report import write_report
from pipeline.models import load_model, load_student, LoadedModel, ModelError, read_json_object

log = logging.getLogger(__name__)



class EvaluationError(PipelineError):
    """A student, teacher or option that evaluation cannot use; the message names it."""


# ---- loading teacher and students -------------------------------------------------------------

def load_students(students: dict[str, str], allow_missing: bool, device) -> dict[str, tuple[Path, LoadedModel]]:
    """name -> (dir, model). A missing dir (or one without weights) is an error naming it, or a
    logged skip with `allow_missing`."""
    loaded = {}
    for name, folder in students.items():
        folder = Path(folder)
        missing = not folder.is_dir() or not (folder / names.OPEN_CLIP_CONFIG).exists() or not (folder / names.WEIGHTS_FILE).exists()
        if missing:
            message = f"student {name!r}: {folder} has no trained student ({names.OPEN_CLIP_CONFIG} + {names.WEIGHTS_FILE})"
            if allow_missing:
                log.warning("%s; skipped (--allow-missing)", message)
                continue
            raise EvaluationError(f"{message}; train it first, or pass --allow-missing to skip it")
        loaded[name] = (folder, load_student(folder, device))
    return loaded


def load_teacher_architecture(split_manifest: dict, teacher_dir: str | Path, device) -> LoadedModel:
    """The teacher's architecture, for timing only (random weights cost the same as trained ones and
    need no download): the features' recorded teacher model name if open_clip knows it, else the
    `open_clip_config.json` in teacher_dir."""
    identity = split_manifest.get("teacher") or {}
    name = identity.get("model")
    tried = []
    if name and not str(name).startswith(("hf-hub:", "local-dir:")):
        try:
            return load_model(name, "", device)
        except ModelError as exc:
            tried.append(f"features teacher identity model {name!r}: {exc}")
    config_path = Path(teacher_dir) / names.OPEN_CLIP_CONFIG
    if config_path.exists():
        dir_name = read_json_object(config_path, "the teacher's open_clip config").get("model_name")
        try:
            return load_model(dir_name, "", device) if dir_name else load_model(f"local-dir:{teacher_dir}", "", device)
        except ModelError:
            try:
                return load_model(f"local-dir:{teacher_dir}", "", device)
            except ModelError as exc:
                tried.append(f"{config_path}: {exc}")
    else:
        tried.append(f"{config_path} not found")
    raise EvaluationError("cannot build the teacher architecture for timing: " + "; ".join(tried))


# ---- the stage -------------------------------------------------------------------------------

def _resolve_device(name: str) -> torch.device:
    try:
        return runtime.resolve_device(name)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"evaluate.device: {exc}") from None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def evaluate(cfg: EvaluateConfig) -> dict:
    """Quality of the teacher (cached embeddings) and each student on `cfg.split`, the encoders'
    cost measured side by side, and per student:
      quality_ratio = student rsum / teacher rsum
      image_time_ratio = student image ms per image / teacher's (at the throughput batch)
      image_latency_ratio, text_latency_ratio = the same at batch 1; text_time_ratio = per text.
    Writes `cfg.metrics_file` (JSON, for `dvc metrics`) and the plots in `cfg.plots_dir`."""
    ks = _check_ks(cfg.ks)
    runtime.set_threads(cfg.threads)
    device = _resolve_device(cfg.device)
    # (the report is written beside its folder and put in place whole: its parent must be writable)
    for folder in {Path(cfg.metrics_file).parent, Path(cfg.plots_dir)} | ({Path(cfg.report_dir).parent} if cfg.report_dir else set()):
        # before any work, not after it
        atomic.prepare_output_dir(folder)
    split_manifest = store.load_split_manifest(cfg.features_dir, cfg.split)
    students = load_students(cfg.students, cfg.allow_missing, device)

    teacher_image, teacher_text, text_to_image = store.load_embeddings(cfg.features_dir, cfg.split)
    log.info("split %s: %d images, %d texts", cfg.split, len(teacher_image), len(teacher_text))
    teacher = retrieval_metrics(teacher_image, teacher_text, text_to_image, ks, cfg.chunk_size, device)
    added = _added_teachers(cfg, teacher_image, teacher_text, text_to_image, ks, device)
    student_metrics = {}
    embeddings = {TEACHER: (teacher_image, teacher_text)}  # for the report's gallery
    for name, (_, loaded) in students.items():
        image_emb, text_emb, student_text_to_image = encode_split(loaded, cfg.features_dir, cfg.split, cfg.batch_size, device)
        if not np.array_equal(student_text_to_image, text_to_image):
            raise store.ShardError(f"{store.split_dir(cfg.features_dir, cfg.split)}: texts changed while reading")
        student_metrics[name] = retrieval_metrics(image_emb, text_emb, text_to_image, ks, cfg.chunk_size, device)
        embeddings[name] = (image_emb, text_emb)
    tasks = [zeroshot.load_task(cfg.features_dir, t) for t in zeroshot.list_tasks(cfg.features_dir)] if cfg.zeroshot else []
    if tasks:
        teacher["zeroshot"] = {task.name: zeroshot.teacher_task_metrics(task) for task in tasks}
        for name, (_, loaded) in students.items():
            student_metrics[name]["zeroshot"] = {
                task.name: zeroshot.student_task_metrics(loaded, task, cfg.batch_size, device) for task in tasks
            }

    timed = {TEACHER: load_teacher_architecture(split_manifest, cfg.teacher_dir, device)}
    timed.update({f"student:{name}": loaded for name, (_, loaded) in students.items()})
    costs = compare_encoder_costs(
        timed, device, cfg.latency_repeats, cfg.throughput_batch, cfg.throughput_repeats
    )
    teacher_cost = costs[TEACHER]
    metrics = {
        "split": cfg.split,
        "num_images": int(len(teacher_image)),
        "num_texts": int(len(teacher_text)),
        "device": str(device),
        "device_name": _device_name(device),
        "threads": int(torch.get_num_threads()),
        "teacher": {**teacher, "model": timed[TEACHER].identity["model"], "cost": teacher_cost},
        **({"teachers": added} if added else {}),
        "students": {},
    }
    for name, quality in student_metrics.items():
        cost = costs[f"student:{name}"]
        metrics["students"][name] = {
            **quality,
            "model": students[name][1].identity["model"],
            "quality_ratio": quality["rsum"] / teacher["rsum"] if teacher["rsum"] else float("nan"),
            "image_time_ratio": cost["image_ms_per_image"] / teacher_cost["image_ms_per_image"],
            "image_latency_ratio": cost["image_latency_ms"] / teacher_cost["image_latency_ms"],
            "text_time_ratio": cost["text_ms_per_text"] / teacher_cost["text_ms_per_text"],
            "text_latency_ratio": cost["text_latency_ms"] / teacher_cost["text_latency_ms"],
            "cost": cost,
        }
    atomic.atomic_write_json(metrics, cfg.metrics_file)
    plots = write_plots(metrics, {name: folder for name, (folder, _) in students.items()}, cfg.plots_dir)
    if cfg.report_dir:
        page = write_report(cfg.report_dir, metrics, plots, cfg.features_dir, cfg.split, embeddings, text_to_image,
                            cfg.report_queries, cfg.report_images)
        log.info("report: %s", page)
    return metrics


def _added_teachers(cfg: EvaluateConfig, teacher_image: np.ndarray, teacher_text: np.ndarray, text_to_image: np.ndarray,
                    ks: list[int], device) -> dict:
    """Retrieval of each added teacher (its cached embeddings of the split) and of the ensemble of all teachers
    with equal shares (the target a student with train.teachers learns), as reference rows."""
    if not cfg.teachers:
        return {}
    rows, parts = {}, [(teacher_image, teacher_text)]
    for name in cfg.teachers:
        image, text = store.added_teacher_rows(cfg.teachers_dir, name, cfg.features_dir, cfg.split)
        image, text = image[:].astype(np.float32), text[:].astype(np.float32)
        rows[name] = {**retrieval_metrics(image, text, text_to_image, ks, cfg.chunk_size, device),
                      "model": (store.added_teacher_manifest(cfg.teachers_dir, name, cfg.split).get("teacher") or {}).get("model")}
        parts.append((image, text))
    shares = [1.0] * len(parts)
    image = store.EnsembleRows([p[0] for p in parts], shares)[:]
    text = store.EnsembleRows([p[1] for p in parts], shares)[:]
    rows["ensemble"] = {**retrieval_metrics(image, text, text_to_image, ks, cfg.chunk_size, device),
                        "model": "+".join([TEACHER, *cfg.teachers])}
    for name, found in rows.items():
        log.info("teacher %s: rsum %.1f", name, found["rsum"])
    return rows


def write_plots(metrics: dict, student_dirs: dict[str, Path], plots_dir: str | Path) -> list[Path]:
    """quality_vs_time.png (+ its .json data) and training_curves.png in `plots_dir` (the per-step curves
    for `dvc plots` are DVCLive's, written by `dsmd train`)."""
    plots_dir = Path(plots_dir)
    points = [{"model": TEACHER, "rsum": metrics["teacher"]["rsum"], "image_ms_per_image": metrics["teacher"]["cost"]["image_ms_per_image"]}]
    points += [
        {"model": name, "rsum": m["rsum"], "image_ms_per_image": m["cost"]["image_ms_per_image"]}
        for name, m in metrics["students"].items()
    ]
    logs = {}
    for name, folder in student_dirs.items():
        path = Path(folder) / names.TRAIN_LOG_FILE
        if path.exists():
            logs[name] = read_train_log(path)
        else:
            log.warning("student %r: no %s, left out of the training curves", name, path)
    written = [
        plot_quality_vs_time(points, plots_dir / names.QUALITY_PLOT),
        atomic.atomic_write_json(points, plots_dir / names.QUALITY_DATA),
        plot_training_curves(logs, plots_dir / names.CURVES_PLOT),
    ]
    return written


def parse_student_options(items: list[str] | None) -> dict[str, str] | None:
    """`--student NAME=DIR` (repeatable) -> {name: dir}; None when not given (params decide)."""
    if not items:
        return None
    students: dict[str, str] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise ConfigError(f"--student expects NAME=DIR, got {item!r}")
        if name.strip() in students:
            raise ConfigError(f"--student {name.strip()!r} given twice")
        students[name.strip()] = folder.strip()
    return students


def format_table(metrics: dict) -> str:
    """Teacher against students: R@K both ways, RSUM, quality ratio, image time ratio."""
    recall_keys = [k for k in metrics["teacher"] if k.startswith(("i2t_r", "t2i_r")) and k[5:].isdigit()]
    header = ["model"] + [k.replace("_r", " R@") for k in recall_keys] + ["RSUM", "quality", "img ms", "img time"]
    rows = [[TEACHER] + [f"{metrics['teacher'][k]:.1f}" for k in recall_keys]
            + [f"{metrics['teacher']['rsum']:.1f}", "1.000", f"{metrics['teacher']['cost']['image_ms_per_image']:.3f}", "1.000"]]
    for name, m in metrics["students"].items():
        rows.append([name] + [f"{m[k]:.1f}" for k in recall_keys]
                    + [f"{m['rsum']:.1f}", f"{m['quality_ratio']:.3f}", f"{m['cost']['image_ms_per_image']:.3f}",
                       f"{m['image_time_ratio']:.3f}"])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    lines.insert(1, "-" * len(lines[0]))
    lines += _zeroshot_lines(metrics)
    lines.append(
        f"split {metrics['split']}: {metrics['num_images']} images, {metrics['num_texts']} texts; "
        f"timed on {metrics['device']} ({metrics['device_name']}), {metrics['threads']} threads"
    )
    return "\n".join(lines)


def _zeroshot_lines(metrics: dict) -> list[str]:
    """Zero-shot top-1 accuracy (%) per task and model, when there are tasks."""
    tasks = list(metrics["teacher"].get("zeroshot", {}))
    if not tasks:
        return []
    models = {TEACHER: metrics["teacher"], **metrics["students"]}
    width = max(len(n) for n in models)
    lines = ["", "zero-shot acc1 (%)".ljust(width) + "  " + "  ".join(t.rjust(8) for t in tasks)]
    for name, m in models.items():
        lines.append(name.ljust(width) + "  " + "  ".join(f"{100 * m['zeroshot'][t]['acc1']:8.1f}" for t in tasks))
    return lines
