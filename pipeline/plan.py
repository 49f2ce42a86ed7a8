"""`dsmd plan`: what a run will cost, measured before it on this device.

Reads params.yaml and the corpus manifest, times a few real batches (the teacher on the corpus's own images and
captions; each student's optimizer step with its loss on batches of the same images and random teacher targets of
the teacher's width), and projects: extraction time (each stored view is one more image through loading and the
image tower), the features' disk size, mining's memory and time, and each student's time per epoch, for one
process and for N ranks (ranks split the work evenly; no communication cost is counted, so treat the N-rank
figures as a lower bound).
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import models
from pipeline.common import runtime
from pipeline.common.params import Params
from pipeline.corpus.augment import decode_image, preprocess_batch
from pipeline.corpus.manifest import load_manifest
from pipeline.corpus.reader import iter_samples, SkipReport
from pipeline.mining import negatives
from pipeline.training import data as data_mod, loop

log = logging.getLogger(__name__)
# Each embedding is stored twice (a Parquet column, and the split's .npy array that training streams rows from);
# ids, keys, compressed captions and references, and the per-id lookups stage two reads per batch (offsets, the
# captions' UTF-8, image references) add about this much a row (measured on the demo features, 2026-12-01: 615.6
# bytes a row of which 512 are the two copies of the 128-wide float16 embedding)
ROW_OVERHEAD_BYTES = 104


@dataclass
class Batch:
    encoded: list[bytes]  # the images as stored
    images: list  # decoded PIL images
    captions: list[str]


def _read_batches(manifest, split_name: str, batch_size: int, count: int) -> tuple[list[Batch], float]:
    """`count` batches of the split's samples (images decoded), and the mean captions per image."""
    split = manifest.splits[split_name]
    samples = iter_samples(split.shards, manifest.fields, SkipReport())
    batches, captions = [], []
    for _ in range(count):
        chunk = list(itertools.islice(samples, batch_size))
        if not chunk:
            break
        batches.append(Batch([s.image_bytes for s in chunk], [decode_image(s.image_bytes) for s in chunk],
                             [c for s in chunk for c in s.captions]))
        captions += [len(s.captions) for s in chunk]
    return batches, float(np.mean(captions)) if captions else 1.0


def _num_samples(manifest, split: str) -> int:
    """The manifest's num_samples of `split`, or (when it has none) its samples counted by reading its shards."""
    spec = manifest.splits[split]
    if spec.num_samples:
        return int(spec.num_samples)
    log.info("split %s: no num_samples in the manifest; counting its samples (reads every shard)", split)
    return sum(1 for _ in iter_samples(spec.shards, manifest.fields, SkipReport()))


def _timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_teacher(params: Params, batches: list[Batch], device: torch.device, repeats: int) -> tuple[dict[str, float], int]:
    """(the timed parts of one batch's extraction, see extraction_seconds; the teacher's width)."""
    teacher = models.load_teacher(params.teacher, device=device)
    teacher.model.eval()
    batch = batches[0]

    def prepare():
        return torch.stack([teacher.preprocess(decode_image(data)) for data in batch.encoded])

    pixels = prepare().to(device)
    tokens = teacher.tokenizer(batch.captions).to(device)

    @torch.inference_mode()
    def encode(tower, inputs):
        with runtime.autocast(device, params.extract.precision):
            tower(inputs)

    seconds = {"loading": _timed(prepare, repeats), "image": _timed(lambda: encode(teacher.model.encode_image, pixels), repeats),
               "text": _timed(lambda: encode(teacher.model.encode_text, tokens), repeats)}
    return {name: t / len(batch.encoded) for name, t in seconds.items()}, teacher.embed_dim


def extraction_seconds(batch_seconds: dict[str, float], views: int, workers: int) -> float:
    """A batch's extraction time from its timed parts ("loading": decode and preprocess, "image", "text": the towers).
    Each stored view is one more image through loading and the image tower. Loading runs in the loader workers
    beside the towers, so a batch costs the slower of the two; with no worker, both."""
    loading = batch_seconds["loading"] * (1 + views)
    towers = batch_seconds["image"] * (1 + views) + batch_seconds["text"]
    return max(towers, loading / workers) if workers > 0 else towers + loading


def _fake_targets(cfg, size: int, dim: int, num_images: int) -> dict[str, torch.Tensor]:
    """Random unit teacher targets of the teacher's width, and mined lists as wide as configured."""
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, dim), dim=-1)  # noqa: E731
    hard = max(1, cfg.distill.hard_negatives)
    ids = lambda: torch.randint(0, num_images, (size, hard))  # noqa: E731
    return {
        data_mod.IMAGE_ID: torch.arange(size), data_mod.TEACHER_IMAGE: unit(size), data_mod.TEACHER_TEXT: unit(size),
        **{emb: unit(size, hard) for emb, _ in data_mod.MINED.values()},
        **{owner: ids() for _, owner in data_mod.MINED.values()},
    }


def time_student(cfg, images: list, captions: list[str], teacher_dim: int, device: torch.device, repeats: int) -> float:
    """Seconds per optimizer step of student `cfg`: decoding-free batch preparation, forward, loss, backward, AdamW."""
    size = cfg.optim.batch_size
    pool = list(itertools.islice(itertools.cycle(zip(images, captions)), size))
    loaded, ctx = loop.build_context(cfg, teacher_dim, total_steps=10 * (repeats + 1), device=device)
    targets = _fake_targets(cfg, size, teacher_dim, num_images=max(size, 1000))

    def step():
        batch = {data_mod.IMAGE: preprocess_batch(loaded.preprocess, [im for im, _ in pool]),
                 data_mod.TEXT: loaded.tokenizer([c for _, c in pool]), **targets}
        loop.optimizer_step(ctx, [batch])

    return _timed(step, repeats)


def time_flat_search(dim: int, queries: int = 512, base: int = 8192) -> float:
    """Seconds per (query x base vector) of an exact inner-product FAISS search at width `dim`."""
    import faiss

    rng = np.random.default_rng(0)
    index = faiss.IndexFlatIP(dim)
    index.add(rng.standard_normal((base, dim), dtype=np.float32))
    q = rng.standard_normal((queries, dim), dtype=np.float32)
    return _timed(lambda: index.search(q, 17), 2) / (queries * base)


def plan(params: Params, ranks: int = 1, repeats: int = 3) -> dict:
    """The projected costs of `params`' run (see the module doc); every time in seconds, every size in bytes."""
    device = runtime.resolve_device(params.extract.device)
    runtime.set_threads(params.extract.threads)
    manifest = load_manifest(params.extract.manifest)
    counts = {name: _num_samples(manifest, name) for name in params.extract.splits}
    batches, captions_per_image = _read_batches(manifest, params.extract.splits[0], params.extract.batch_size, 1)
    image_seconds, dim = time_teacher(params, batches, device, repeats)
    views = {name: params.extract.views_of(name) for name in counts}
    per_image = {name: extraction_seconds(image_seconds, views[name], params.extract.num_workers) for name in counts}
    width = 2 if params.extract.embedding_dtype == "float16" else 4
    images_total = sum(counts.values())
    texts_total = images_total * captions_per_image
    rows_total = texts_total + sum(n * (1 + views[name]) for name, n in counts.items())
    out: dict = {
        "device": str(device), "ranks": ranks, "teacher_dim": dim, "captions_per_image": captions_per_image,
        "split_images": counts, "split_views": views,
        "extract_seconds_per_image": per_image,
        "extract_seconds": {name: n * per_image[name] / ranks for name, n in counts.items()},
        "features_bytes": int((2 * width * dim + ROW_OVERHEAD_BYTES) * rows_total),
    }
    train_images = counts.get(params.train.split, 0)
    train_texts = train_images * captions_per_image
    pair_seconds = time_flat_search(dim)
    # the four lists of dsmd mine: i2t, t2i, i2i, t2t, each a search of every query against every key
    searches = train_images * train_texts * 2 + train_images ** 2 + train_texts ** 2
    out["mine_seconds"] = searches * pair_seconds / ranks
    out["mine_memory_bytes"] = sum(negatives.memory_bytes(train_images, int(train_texts), dim, params.mine).values())
    runtime.set_threads(params.train.optim.threads)
    out["students"] = {}
    for name in params.students:
        cfg = params.student(name)
        step = time_student(cfg, batches[0].images, batches[0].captions, dim, device, repeats)
        steps = math.ceil(train_images / cfg.optim.batch_size)
        out["students"][name] = {"seconds_per_step": step, "steps_per_epoch": steps,
                                 "epoch_seconds": steps * step / ranks,
                                 "run_seconds": data_mod.total_steps(train_images, cfg.optim.batch_size, cfg.optim.epochs,
                                                                     cfg.optim.max_steps) * step / ranks}
    return out


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024


def _split_line(p: dict, name: str) -> str:
    views = f" + {p['split_views'][name]} views each" if p["split_views"][name] else ""
    return f"{name} {p['split_images'][name]} img{views} at {1 / p['extract_seconds_per_image'][name]:.0f} img/s a rank"


def format_plan(p: dict) -> str:
    lines = [f"on {p['device']}, {p['ranks']} rank(s) (even split, no communication counted):",
             f"extract  {_duration(sum(p['extract_seconds'].values()))}  "
             f"({', '.join(_split_line(p, name) for name in p['split_images'])}; {p['captions_per_image']:.1f} captions an image)",
             f"features {_size(p['features_bytes'])} on disk (teacher width {p['teacher_dim']})",
             f"mine     {_duration(p['mine_seconds'])} (exact search), {_size(p['mine_memory_bytes'])} of indexes"]
    for name, s in p["students"].items():
        lines.append(f"train {name}: {_duration(s['epoch_seconds'])} an epoch ({s['steps_per_epoch']} steps of "
                     f"{s['seconds_per_step']:.2f} s), {_duration(s['run_seconds'])} for the configured run")
    return "\n".join(lines)
