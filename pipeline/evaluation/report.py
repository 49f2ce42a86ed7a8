"""`outputs/report/index.html`: what the teacher and each student retrieve, as a static page that opens from disk.

The page holds the metrics table, the plots (copied beside it) and a retrieval gallery: for a seeded choice of test
captions (half of them naming the split's rarest words: the tail), each model's top images, the true image marked;
for a seeded choice of test images, each model's top captions, the true ones marked. Thumbnails are decoded from
the split's stored or referenced image bytes (the source shards), never re-rendered.
"""
from __future__ import annotations

import html
import io
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.common import atomic, names
from pipeline.corpus.augment import decode_image
from pipeline.evaluation.plots import TEACHER
from pipeline.features import schema, store

THUMB_SIZE = 96


def pick_captions(captions: list[str], count: int, seed: int) -> list[int]:
    """`count` caption rows: half naming the split's rarest words (the tail concepts), half uniformly at random."""
    rng = np.random.default_rng(seed)
    words = [set(re.findall(r"[a-z]+", c.lower())) for c in captions]
    freq = Counter(w for ws in words for w in ws)
    rarity = np.array([min((freq[w] for w in ws), default=len(captions)) for ws in words])
    tail = [int(i) for i in np.argsort(rarity, kind="stable")[: max(1, count // 2)]]
    rest = [int(i) for i in rng.permutation(len(captions)) if int(i) not in tail]
    return (tail + rest)[:count]


def top_k(queries: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """Row i: the indices of the k keys most similar to query i (cosine of unit vectors), best first."""
    sims = queries.astype(np.float32) @ keys.astype(np.float32).T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def _thumb(image_bytes: bytes, path: Path) -> None:
    image = decode_image(image_bytes).convert("RGB")
    image.thumbnail((THUMB_SIZE, THUMB_SIZE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic.atomic_write_bytes(buffer.getvalue(), path)


def _metrics_table(metrics: dict) -> str:
    added = [(f"{TEACHER}:{name}", {**m, "quality_ratio": m["rsum"] / metrics["teacher"]["rsum"], "image_time_ratio": float("nan")})
             for name, m in metrics.get("teachers", {}).items()]  # cached embeddings only: no cost measured
    rows = [(TEACHER, metrics["teacher"])] + added + list(metrics["students"].items())
    keys = [k for k in metrics["teacher"] if re.fullmatch(r"(i2t|t2i)_r\d+", k)] + ["rsum"]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["model"] + keys + ["RSUM / teacher", "image time / teacher"])
    body = []
    for name, m in rows:
        ratio = m.get("quality_ratio", 1.0)
        time_ratio = m.get("image_time_ratio", 1.0)
        cells = [html.escape(name)] + [f"{m[k]:.1f}" for k in keys] + [f"{ratio:.3f}", f"{time_ratio:.3f}"]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table class='metrics'><tr>{head}</tr>{''.join(body)}</table>"


STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1400px} table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} td:first-child,th:first-child{text-align:left}
.query{margin:1.2em 0;border-top:1px solid #ddd;padding-top:.6em} .model{display:flex;align-items:center;gap:6px;margin:3px 0}
.model b{width:9em} .hit img{outline:4px solid #1a9e3a} img.thumb{width:80px;height:80px;image-rendering:pixelated}
ol{margin:0} li.hit{color:#1a9e3a;font-weight:bold} .plots img{max-width:48%}"""


def write_report(out_dir: str | Path, metrics: dict, plots: list[Path], features_dir: str | Path, split: str,
                 embeddings: dict[str, tuple[np.ndarray, np.ndarray]], text_to_image: np.ndarray,
                 queries: int = 8, images: int = 4, seed: int = 0, top_images: int = 5, top_captions: int = 3) -> Path:
    """Write `out_dir/index.html` and its thumbnails and plots. `embeddings`: model name -> (image (N, D), text
    (M, D)) unit vectors in image_id / text_id order, the teacher's first."""
    final, out_dir = Path(out_dir), atomic.staging_dir(out_dir)  # put in place whole: a killed run leaves no mixed page
    shutil.rmtree(out_dir, ignore_errors=True)
    atomic.prepare_output_dir(out_dir)
    thumbs = out_dir / names.REPORT_THUMBS
    thumbs.mkdir(exist_ok=True)
    captions = store.read_texts(features_dir, split, columns=[schema.CAPTION])[schema.CAPTION].to_pylist()
    caption_rows = pick_captions(captions, queries, seed)
    num_images = len(next(iter(embeddings.values()))[0])
    image_rows = [int(i) for i in np.random.default_rng(seed + 1).choice(num_images, min(images, num_images), replace=False)]

    ranked_images = {m: top_k(t[caption_rows], i, top_images) for m, (i, t) in embeddings.items()}
    ranked_captions = {m: top_k(i[image_rows], t, top_captions) for m, (i, t) in embeddings.items()}
    shown = set(image_rows) | {int(x) for r in ranked_images.values() for x in r.ravel()}
    source = store.image_bytes(features_dir, split)
    for row in sorted(shown):
        _thumb(source[row], thumbs / f"{row}.png")
    for plot in plots:
        if Path(plot).suffix == ".png" and Path(plot).exists():
            shutil.copyfile(plot, out_dir / Path(plot).name)

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>dsmd report: {html.escape(split)}</title>"
             f"<style>{STYLE}</style></head><body><h1>Teacher and students on {html.escape(split)}</h1>",
             f"<p>{metrics['num_images']} images, {metrics['num_texts']} captions; timed on {html.escape(str(metrics['device']))}"
             f" ({html.escape(str(metrics['device_name']))}), {metrics['threads']} threads.</p>",
             _metrics_table(metrics), "<div class='plots'>"]
    parts += [f"<img src='{Path(p).name}' alt='{Path(p).stem}'>" for p in plots if Path(p).suffix == ".png"]
    parts.append(f"</div><h2>Text to image: each model's top {top_images} (the true image outlined)</h2>")
    for q, row in enumerate(caption_rows):
        true = int(text_to_image[row])
        parts.append(f"<div class='query caption' data-text-row='{row}' data-true-image='{true}'>"
                     f"<p>&ldquo;{html.escape(captions[row])}&rdquo; {'(tail)' if q < max(1, queries // 2) else ''}</p>")
        for model, ranked in ranked_images.items():
            cells = "".join(f"<span class='{'hit' if int(i) == true else 'miss'}' data-image='{int(i)}'>"
                            f"<img class='thumb' src='{names.REPORT_THUMBS}/{int(i)}.png' alt='image {int(i)}'></span>" for i in ranked[q])
            parts.append(f"<div class='model'><b>{html.escape(model)}</b>{cells}</div>")
        parts.append("</div>")
    parts.append(f"<h2>Image to text: each model's top {top_captions} captions (the true ones in green)</h2>")
    for q, row in enumerate(image_rows):
        parts.append(f"<div class='query image' data-image-row='{row}'><img class='thumb' src='{names.REPORT_THUMBS}/{row}.png' alt='image {row}'>")
        for model, ranked in ranked_captions.items():
            items = "".join(f"<li class='{'hit' if int(text_to_image[t]) == row else 'miss'}' data-text='{int(t)}'>"
                            f"{html.escape(captions[int(t)])}</li>" for t in ranked[q])
            parts.append(f"<div class='model'><b>{html.escape(model)}</b><ol>{items}</ol></div>")
        parts.append("</div>")
    parts.append("</body></html>")
    atomic.atomic_write_text("\n".join(parts), out_dir / names.REPORT_FILE)
    return atomic.publish_dir(out_dir, final) / names.REPORT_FILE
