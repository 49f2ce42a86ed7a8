"""The figures of `dsmd evaluate`: quality against image-encoding time, and the training curves read
from each student's `train_log.jsonl`."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from pipeline.common import atomic, names

log = logging.getLogger(__name__)

TEACHER = "teacher"


def read_train_log(path: str | Path) -> list[dict]:
    """The JSON lines of a `train_log.jsonl`; lines that are not JSON objects with a `step` are
    skipped and counted in a warning."""
    path = Path(path)
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
        else:
            bad += 1
    if bad:
        log.warning("%s: skipped %d malformed line(s)", path, bad)
    return records


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic.atomic_write_bytes(buffer.getvalue(), path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def quality_figure(points: list[dict]):
    """(figure, axes, labels) of RSUM against image-encoding ms per image, one labelled point per model.
    Margins keep every label inside the axes, below the title; labels of nearby points are staggered."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(6, 4.5))
    labels = []
    for index, point in enumerate(sorted(points, key=lambda p: p["rsum"])):
        marker = "*" if point["model"] == TEACHER else "o"
        ax.scatter(point["image_ms_per_image"], point["rsum"], s=120 if marker == "*" else 60, marker=marker)
        labels.append(ax.annotate(point["model"], (point["image_ms_per_image"], point["rsum"]), textcoords="offset points",
                                  xytext=(7, (-4, 8, -16)[index % 3]), fontsize=9))
    ax.set_xscale("log")  # students are meant to be several times cheaper than the teacher
    ax.margins(x=0.25, y=0.18)
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # labelled ticks even within one decade
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("image encoding time (ms per image, throughput batch, log scale)")
    ax.set_ylabel("RSUM")
    ax.set_title("retrieval quality against image-encoding time")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig, ax, labels


def plot_quality_vs_time(points: list[dict], path: str | Path) -> Path:
    fig, _, _ = quality_figure(points)
    return _save_figure(fig, Path(path))


def plot_training_curves(logs: dict[str, list[dict]], path: str | Path) -> Path:
    """Left: loss_total and every loss_<term> against step (log scale); right: balancer weights."""
    plt = _pyplot()
    fig, (loss_ax, weight_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    # colour = loss term (the same in both panels), line style = student
    terms = sorted({k.split("_", 1)[1] for records in logs.values() for r in records for k in r
                    if k.startswith(("loss_", "weight_"))})
    colours = {term: f"C{i % 10}" for i, term in enumerate(terms)}
    styles = ["-", "--", ":", "-."]
    for index, (student, records) in enumerate(logs.items()):
        keys = sorted({k for r in records for k in r if k.startswith(("loss_", "weight_"))})
        for key in keys:
            steps = [r["step"] for r in records if isinstance(r.get(key), (int, float))]
            values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
            term = key.split("_", 1)[1]
            ax = loss_ax if key.startswith("loss_") else weight_ax
            ax.plot(steps, values, styles[index % len(styles)], color=colours[term],
                    linewidth=2.2 if term == "total" else 1.2, label=f"{student}: {term}")
    loss_ax.set_yscale("log", nonpositive="mask")
    loss_ax.set_title("losses")
    weight_ax.set_title("balancer weights")
    for ax in (loss_ax, weight_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if not logs:
        fig.suptitle(f"no {names.TRAIN_LOG_FILE} found beside the students")
    return _save_figure(fig, Path(path))


