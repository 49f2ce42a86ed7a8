"""Corpora larger than memory: peak RSS of `dsmd train` and `dsmd mine` at N and 10N, loader throughput,
the epoch time of streamed referenced shards against today's in-memory copies, and the disk they take.

Each run is its own subprocess (its peak is `VmHWM`, of that process image alone). The corpus is synthetic:
real tar shards of small PNGs (64 distinct images cycled) with 2-5 captions each, and features written as
`dsmd extract` writes them (images referenced by byte offset, embeddings as Parquet + .npy) but with seeded
random unit vectors for the teacher embeddings: memory and speed do not depend on what the vectors say, and
running a teacher over 200k images would take this 2-core machine most of an hour.

    .venv/bin/python benchmarks/memory.py                 # N = 20000: ~10 minutes on 2 cores
    .venv/bin/python benchmarks/memory.py --n 2000 --steps 5   # quick
    # what a rank holds per image, up to 100N (2M images, 7M captions, ~17 GB of scratch; ~20 minutes):
    .venv/bin/python benchmarks/memory.py --n 20000 --train-only --multiples 10 100
    # what dsmd mine holds at 100N (IVF-PQ, text codes in 3 shards; nprobe 1 and refine 1 keep it under an hour):
    .venv/bin/python benchmarks/memory.py --n 20000 --mine-only --multiples 100 --mine-nprobe 1 --mine-refine 1 --work W
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.common import atomic
from pipeline.corpus import reader
from pipeline.features import schema, store  # noqa: E402
from pipeline.features.extract import source_signature  # noqa: E402
from pipeline.corpus.manifest import FieldMapping  # noqa: E402

DIM = 256  # a teacher embedding width twice the demo teacher's 128: the memory figures err on the large side
PER_SHARD = 1000


def write_corpus(root: Path, n: int, seed: int = 0) -> list[str]:
    """n samples in tar shards: a 64 px PNG (one of 64) and 2-5 captions each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pngs = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    root.mkdir(parents=True, exist_ok=True)
    urls = []
    for shard in range((n + PER_SHARD - 1) // PER_SHARD):
        path = root / f"train-{shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(shard * PER_SHARD, min(n, (shard + 1) * PER_SHARD)):
                captions = "\n".join(f"a picture {i} seen in way {c}" for c in range(2 + i % 4)).encode()
                for name, data in ((f"{i:09d}.png", pngs[i % 64]), (f"{i:09d}.txt", captions)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    return urls


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_features(urls: list[str], features: Path, copy_images: bool, seed: int = 0) -> None:
    """A features split as `dsmd extract` writes it, one Parquet pair per shard, embeddings random."""
    rng = np.random.default_rng(seed)
    fields = FieldMapping(image_extensions=["png"], caption_source="txt", caption_field="")
    image_tables, text_tables, parts = [], [], []
    meta = {schema.META_SPLIT: "train", schema.META_MANIFEST_SHA256: "synthetic"}
    for url in urls:
        report = reader.SkipReport()
        samples = list(reader.iter_shard(url, fields, report))
        image_emb = unit_rows(rng, len(samples))
        owners = np.repeat(np.arange(len(samples)), [len(s.captions) for s in samples])
        text_emb = image_emb[owners] + 0.5 * unit_rows(rng, len(owners))
        image_tables.append(schema.images_table(
            [s.key for s in samples], [s.shard for s in samples], ["png"] * len(samples),
            [s.image_bytes if copy_images else None for s in samples], image_emb, "float16", meta,
            image_offsets=[s.image_offset for s in samples], image_sizes=[s.image_size for s in samples]))
        text_tables.append(schema.texts_table(
            owners, [i for s in samples for i in range(len(s.captions))], [c for s in samples for c in s.captions],
            text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True), "float16", meta))
        parts.append({"url": url, "skipped": report.to_dict(),
                      "source": {**source_signature(url), "sha256": atomic.sha256_file(url)}})
    # dense split-wide ids, as extract's _finalize assigns them
    image_offset = text_offset = 0
    for index, (images, texts) in enumerate(zip(image_tables, text_tables)):
        import pyarrow.compute as pc
        image_tables[index] = images.set_column(0, schema.IMAGE_ID, pc.add(images[schema.IMAGE_ID], image_offset))
        texts = texts.set_column(0, schema.TEXT_ID, pc.add(texts[schema.TEXT_ID], text_offset))
        text_tables[index] = texts.set_column(1, schema.IMAGE_ID, pc.add(texts[schema.IMAGE_ID], image_offset))
        image_offset += images.num_rows
        text_offset += texts.num_rows
    info = {"teacher": {"model": "synthetic", "embed_dim": DIM}, "manifest_sha256": "synthetic", "embedding_dim": DIM,
            "embedding_dtype": "float16", "views": 0, "store_images": copy_images, "source_shards": urls,
            "shard_parts": parts}
    store.write_split(features, "train", image_tables, text_tables, info)


def write_features_direct(root: Path, features: Path, n: int, seed: int = 0, part: int = 100_000) -> None:
    """A features split of n images without writing n images: every image refers, by byte offset as `dsmd extract`
    records referenced images, to one of 64 PNGs in a single tar; 2-5 captions each and random unit embeddings,
    written as `dsmd extract` writes them (Parquet + .npy + the per-id lookups), part by part."""
    (url,) = write_corpus(root, 64, seed)
    fields = FieldMapping(image_extensions=["png"], caption_source="txt", caption_field="")
    samples = list(reader.iter_shard(url, fields, reader.SkipReport()))
    offsets = np.array([s.image_offset for s in samples], np.int64)
    sizes = np.array([s.image_size for s in samples], np.int64)
    rng = np.random.default_rng(seed)
    meta = {schema.META_SPLIT: "train", schema.META_MANIFEST_SHA256: "synthetic"}
    image_tables, text_tables = [], []
    text_start = 0
    for start in range(0, n, part):
        ids = np.arange(start, min(n, start + part))
        per_image = 2 + ids % 4
        owners = np.repeat(ids, per_image)
        caption_index = np.arange(len(owners)) - np.repeat(np.cumsum(per_image) - per_image, per_image)
        image_emb = unit_rows(rng, len(ids))
        text_emb = image_emb[owners - start] + 0.5 * unit_rows(rng, len(owners))
        images = schema.images_table(
            [f"{i:09d}" for i in ids], [url] * len(ids), ["png"] * len(ids), [None] * len(ids), image_emb, "float16", meta,
            image_offsets=offsets[ids % 64].tolist(), image_sizes=sizes[ids % 64].tolist())
        texts = schema.texts_table(owners, caption_index, [f"a picture {i} seen in way {c}" for i, c in zip(owners, caption_index)],
                                   text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True), "float16", meta)
        import pyarrow as pa
        image_tables.append(images.set_column(0, schema.IMAGE_ID, pa.array(ids, pa.int64())))
        texts = texts.set_column(0, schema.TEXT_ID, pa.array(np.arange(text_start, text_start + len(owners)), pa.int64()))
        text_tables.append(texts)
        text_start += len(owners)
    info = {"teacher": {"model": "synthetic", "embed_dim": DIM}, "manifest_sha256": "synthetic", "embedding_dim": DIM,
            "embedding_dtype": "float16", "views": 0, "store_images": False, "source_shards": [url],
            "shard_parts": [{"url": url, "skipped": {}, "source": {**source_signature(url), "sha256": atomic.sha256_file(url)}}]}
    store.write_split(features, "train", image_tables, text_tables, info)


def write_random_negatives(features: Path, negatives: Path, k: int = 16, seed: int = 0) -> None:
    """Random neighbour lists in the four directions (memory and speed only: never trained on for quality)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = store.load_split_manifest(features, "train")
    fingerprint = store.features_fingerprint(features, "train")
    rng = np.random.default_rng(seed)
    sizes = {"i": manifest["num_images"], "t": manifest["num_texts"]}
    for direction in schema.NEIGHBOR_DIRECTIONS:
        rows, targets = sizes[direction[0]], sizes[direction[2]]
        ids = rng.integers(0, targets, (rows, k))
        offsets = pa.array(np.arange(0, rows * k + 1, k, dtype=np.int32))
        table = pa.Table.from_arrays(
            [pa.array(np.arange(rows), pa.int64()), pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1), pa.int64())),
             pa.ListArray.from_arrays(offsets, pa.array(np.zeros(rows * k, np.float32), pa.float32()))],
            schema=schema.neighbors_schema(direction, {schema.META_FEATURES_FINGERPRINT: fingerprint}))
        # row groups of 4 x query_chunk rows, as `dsmd mine` writes them
        atomic.atomic_write_with(store.neighbors_path(negatives, "train", direction),
                                 lambda tmp, table=table: pq.write_table(table, tmp, row_group_size=16384, compression="zstd"))
        if hasattr(store, "write_neighbor_rows"):  # and the per-batch ids, as `dsmd mine` does (since 2026-12-01)
            store.write_neighbor_rows(negatives, "train", direction, k)


# The stage's own peak: VmHWM of this process image. (ru_maxrss is not reset by execve: a child forked from a
# large parent starts at the parent's size.) The peak-RSS runs use num_workers 0, so all work is this process's.
RUN_STAGE = """import runpy, sys, time
stage = sys.argv[1]
sys.argv = [f"dsmd-{stage}", *sys.argv[2:]]
started = time.perf_counter()
try:
    runpy.run_module(f"stages.{stage}", run_name="__main__")
finally:
    peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(f"BENCH peak_rss_kib={peak} seconds={time.perf_counter() - started:.2f}", file=sys.stderr)
"""


def run_stage(stage: str, params: dict, args: list[str], work: Path) -> dict:
    path = work / f"params-{time.perf_counter_ns()}.yaml"
    path.write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    log = path.with_suffix(".log")  # the stage's progress, to follow a long run (tail -f)
    with open(log, "w") as stderr:
        result = subprocess.run([sys.executable, "-c", RUN_STAGE, stage, "--params", str(path), *args], cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    output = log.read_text()
    if result.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{output[-4000:]}")
    line = output.rsplit("BENCH ", 1)[1].split("\n", 1)[0]
    values = dict(item.split("=") for item in line.split())
    return {"peak_rss_mib": int(values["peak_rss_kib"]) / 1024, "seconds": float(values["seconds"])}


def train_params(features: Path, negatives: Path, steps: int, loading: str, epochs: float = 0.0, workers: int = 1) -> dict:
    return {"train": {
        "model": "dsmd-tiny-student", "features_dir": str(features), "negatives_dir": str(negatives),
        "data_loading": loading, "live_dir": "", "val_every": 0,
        "optim": {"max_steps": steps, "epochs": epochs or 1.0, "batch_size": 256, "threads": 2, "num_workers": workers,
                  "log_every": 10, "warmup_steps": 5},
    }}


def loader_throughput(features: Path, negatives: Path, batches: int, loading: str) -> float:
    """Samples per second of one loader process (what a DataLoader worker runs: the DSMD student's batches
    of 256 with mined negatives, no model step), after one warm-up batch."""
    import torch

    from pipeline import models
    from pipeline.training import data as data_mod

    torch.set_num_threads(1)
    student = models.load_model("dsmd-tiny-student", "")
    data = data_mod.load_shards_data(features, "train", stream=loading == "stream")
    negatives_found = data_mod.load_negatives(negatives, "train", data, 4, features)
    dataset = data_mod.TrainingDataset(data, student.preprocess, student.tokenizer, negatives=negatives_found)
    sampler = data_mod.GlobalBatchSampler(data.trainable_image_ids(), 256, batches + 1)
    keys = list(sampler)
    dataset.__getitems__(keys[0])
    started = time.perf_counter()
    for batch in keys[1:]:
        dataset.__getitems__(batch)
    return batches * 256 / (time.perf_counter() - started)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="images at the small size (the large one is 10x)")
    parser.add_argument("--steps", type=int, default=20, help="training steps of the peak-RSS runs (same at N and 10N)")
    parser.add_argument("--mine-budget-mb", type=int, default=64,
                        help="mine.memory_budget_mb of both mining runs (64: IVF-PQ for every database above 64 MiB of float32)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory.json")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--train-only", action="store_true", help="only the peak RSS of dsmd train at N and 10N "
                        "(no epoch timing, loader or mining): a quick check of what a rank holds per image")
    parser.add_argument("--multiples", type=int, nargs="+", default=[10], help="with --train-only: the larger sizes as "
                        "multiples of --n (e.g. 10 100); their features are generated directly (64 PNGs referenced by "
                        "offset), not through tars")
    parser.add_argument("--with-mine", action="store_true", help="with --train-only: also the peak RSS of dsmd mine "
                        "(k 8, --mine-budget-mb) at N and at the largest multiple")
    parser.add_argument("--mine-only", action="store_true", help="only the peak RSS of dsmd mine at N and the largest "
                        "of --multiples (features generated directly; kept in --work and reused when there)")
    parser.add_argument("--mine-nprobe", type=int, default=16, help="mine.nprobe of the mining runs")
    parser.add_argument("--mine-refine", type=int, default=4, help="mine.refine_factor of the mining runs")
    parser.add_argument("--rate-steps", type=int, default=400, help="with --train-only: steps of the samples/s runs "
                        "(1 loader worker), twice at N and twice at the largest multiple (N, L, L, N); 400 steps put the one-off "
                        "warm-up of a cold page cache (the first ~30 steps at 100N) inside the spread; 0 = none")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="dsmd-memory-"))
    if args.train_only:
        return train_only(args, work)
    if args.mine_only:
        return mine_only(args, work)
    results: dict = {"n": args.n, "steps": args.steps, "cpu_count": os.cpu_count()}
    sets = {}
    for label, n in (("N", args.n), ("10N", 10 * args.n)):
        urls = write_corpus(work / f"corpus-{label}", n)
        for copy_images in (False, True) if label == "N" else (False,):
            features = work / f"features-{label}-{'copied' if copy_images else 'referenced'}"
            write_features(urls, features, copy_images)
            write_random_negatives(features, work / f"negatives-{label}-{features.name}")
            sets[(label, copy_images)] = (features, work / f"negatives-{label}-{features.name}")
        print(f"{label}: {n} images written", flush=True)

    train = {}
    for label in ("N", "10N"):
        features, negatives = sets[(label, False)]
        train[label] = run_stage("train", train_params(features, negatives, args.steps, "stream", workers=0),
                                 ["--out-dir", str(work / f"student-{label}")], work)
        print(f"train {label} streamed: {train[label]}", flush=True)
    features, negatives = sets[("10N", False)]
    train["10N in memory"] = run_stage("train", train_params(features, negatives, args.steps, "memory", workers=0),
                                       ["--out-dir", str(work / "student-10N-memory")], work)
    print(f"train 10N embeddings in memory: {train['10N in memory']}", flush=True)
    results["train_peak_rss_mib"] = train
    results["train_rss_ratio_10N_over_N"] = train["10N"]["peak_rss_mib"] / train["N"]["peak_rss_mib"]
    # what each image (with its 2-5 captions) adds to a rank, and a rank's memory projected to LAION-400M from it
    per_image = (train["10N"]["peak_rss_mib"] - train["N"]["peak_rss_mib"]) * 2**20 / (9 * args.n)
    results["train_bytes_per_image"] = per_image
    results["train_rank_gib_projected_400M"] = (train["N"]["peak_rss_mib"] * 2**20 + per_image * 400e6) / 2**30

    # an epoch at N: streamed referenced shards against today's in-memory copies, alternated, twice each
    runs = {"streamed referenced": (False, "stream"), "in-memory copies": (True, "memory")}
    epoch = {name: [] for name in runs}
    for repeat in range(2):
        for name, (copy_images, loading) in runs.items():
            features, negatives = sets[("N", copy_images)]
            out = work / f"epoch-{copy_images}-{repeat}"
            run = run_stage("train", train_params(features, negatives, 0, loading, epochs=1.0), ["--out-dir", str(out)], work)
            run["samples_per_s"] = json.loads((out / "train_summary.json").read_text())["samples_per_s"]
            epoch[name].append(run)
            print(f"epoch {name}: {run}", flush=True)
    results["epoch"] = epoch
    mean_seconds = {name: float(np.mean([r["seconds"] for r in found])) for name, found in epoch.items()}
    results["epoch_time_ratio_streamed_over_memory"] = mean_seconds["streamed referenced"] / mean_seconds["in-memory copies"]

    training_rate = float(np.mean([r["samples_per_s"] for r in epoch["streamed referenced"]]))
    loader = {}
    for name, (copy_images, loading) in runs.items():
        features, negatives = sets[("N", copy_images)]
        loader[name] = loader_throughput(features, negatives, 10, loading)
        print(f"loader {name}: {loader[name]:.0f} samples/s (one process)", flush=True)
    results["loader_samples_per_s"] = loader
    results["loader_over_training_throughput"] = {name: rate / training_rate for name, rate in loader.items()}

    mine = {label: mine_run(sets[(label, False)][0], work / f"mined-{label}", args.mine_budget_mb, work, args.mine_nprobe,
                            args.mine_refine) for label in ("N", "10N")}
    results["mine"] = mine
    results["mine_rss_ratio_10N_over_N"] = mine["10N"]["peak_rss_mib"] / mine["N"]["peak_rss_mib"]

    results["features_bytes"] = {"referenced": folder_bytes(sets[("N", False)][0]), "copied": folder_bytes(sets[("N", True)][0])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"peak RSS of dsmd train, 10N / N: {results['train_rss_ratio_10N_over_N']:.3f} (target <= 1.05)")
    print(f"dsmd train: {results['train_bytes_per_image']:.0f} bytes a rank per image (with 2-5 captions); a rank at "
          f"400M images: {results['train_rank_gib_projected_400M']:.1f} GiB projected (target < 4)")
    print(f"an epoch, streamed referenced / in-memory copies: {results['epoch_time_ratio_streamed_over_memory']:.3f} (target <= 1.10)")
    for name, ratio in results["loader_over_training_throughput"].items():
        print(f"loader ({name}) / training throughput: {ratio:.2f} (target >= 3)")
    print(f"peak RSS of dsmd mine, 10N / N: {results['mine_rss_ratio_10N_over_N']:.3f} (target <= 1.5; "
          f"indexes N {results['mine']['N']['indexes']}, 10N {results['mine']['10N']['indexes']})")


def train_only(args, work: Path) -> None:
    """Peak RSS of `dsmd train` (streamed, 0 workers) at N and each multiple, the bytes a rank holds per image (from
    the largest size), a rank projected to 400M images, and samples/s at N against the largest size."""
    labels = {"N": args.n, **{f"{m}N": m * args.n for m in args.multiples}}
    results: dict = {"n": args.n, "steps": args.steps, "cpu_count": os.cpu_count(), "features": "generated directly"}
    train, rate = {}, {}
    for label, n in labels.items():
        features, negatives = work / f"features-{label}", work / f"negatives-{label}"
        started = time.perf_counter()
        write_features_direct(work / f"png-{label}", features, n)
        write_random_negatives(features, negatives)
        print(f"{label}: {n} images written in {time.perf_counter() - started:.0f}s", flush=True)
        train[label] = run_stage("train", train_params(features, negatives, args.steps, "stream", workers=0),
                                 ["--out-dir", str(work / f"student-{label}")], work)
        print(f"train {label}: {train[label]}", flush=True)
        if label != "N" and label != list(labels)[-1]:
            shutil.rmtree(features), shutil.rmtree(negatives)  # disk: only N and the largest are kept
    largest = list(labels)[-1]
    if args.rate_steps:  # N, largest, largest, N: a drift of the machine over the runs weighs on both sizes alike
        for index, label in enumerate(("N", largest, largest, "N")):
            out = work / f"rate-{index}-{label}"
            run_stage("train", train_params(work / f"features-{label}", work / f"negatives-{label}", args.rate_steps,
                                            "stream", workers=1), ["--out-dir", str(out)], work)
            rate.setdefault(label, []).append(json.loads((out / "train_summary.json").read_text())["samples_per_s"])
            print(f"samples/s {label}: {rate[label][-1]:.0f}", flush=True)
    if args.with_mine:
        results["mine"] = {label: mine_run(work / f"features-{label}", work / f"mined-{label}", args.mine_budget_mb, work,
                                           args.mine_nprobe, args.mine_refine) for label in ("N", largest)}
        results["mine_rss_ratio"] = results["mine"][largest]["peak_rss_mib"] / results["mine"]["N"]["peak_rss_mib"]
    results["train_peak_rss_mib"] = train
    results["train_rss_ratio_over_N"] = {label: train[label]["peak_rss_mib"] / train["N"]["peak_rss_mib"] for label in labels}
    per_image = (train[largest]["peak_rss_mib"] - train["N"]["peak_rss_mib"]) * 2**20 / (labels[largest] - args.n)
    results["train_bytes_per_image"] = per_image
    results["train_rank_gib_projected_400M"] = (train["N"]["peak_rss_mib"] * 2**20 + per_image * 400e6) / 2**30
    if rate:
        results["samples_per_s"] = rate
        results["samples_per_s_ratio"] = statistics.fmean(rate[largest]) / statistics.fmean(rate["N"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    for label in labels:
        if label != "N":
            target = {"10N": " (target <= 1.05)", "100N": " (target <= 1.10)"}.get(label, "")
            print(f"peak RSS of dsmd train, {label} / N: {results['train_rss_ratio_over_N'][label]:.3f}{target}")
    print(f"dsmd train: {per_image:.1f} bytes a rank per image (with 2-5 captions); a rank at 400M images: "
          f"{results['train_rank_gib_projected_400M']:.2f} GiB projected (target < 4)")
    if rate:
        print(f"samples/s, {largest} / N: {results['samples_per_s_ratio']:.3f} (target >= 0.90)")
    if args.with_mine:
        print(f"peak RSS of dsmd mine, {largest} / N: {results['mine_rss_ratio']:.3f} (target <= 1.5; indexes "
              f"N {results['mine']['N']['indexes']}, {largest} {results['mine'][largest]['indexes']})")


def mine_only(args, work: Path) -> None:
    """Peak RSS of `dsmd mine` at N and at the largest multiple (IVF-PQ above --mine-budget-mb of float32), and
    what it holds per database vector beyond N's run."""
    labels = {"N": args.n, f"{args.multiples[-1]}N": args.multiples[-1] * args.n}
    results: dict = {"n": args.n, "cpu_count": os.cpu_count(), "features": "generated directly",
                     "mine": {"k": 8, "memory_budget_mb": args.mine_budget_mb, "nprobe": args.mine_nprobe,
                              "refine_factor": args.mine_refine, "query_chunk": 4096}}
    runs, vectors = {}, {}
    for label, n in labels.items():
        features = work / f"features-{label}"
        if not (features / "train" / schema.SPLIT_MANIFEST).exists():
            started = time.perf_counter()
            write_features_direct(work / f"png-{label}", features, n)
            print(f"{label}: {n} images written in {time.perf_counter() - started:.0f}s", flush=True)
        shutil.rmtree(work / f"mined-{label}", ignore_errors=True)
        runs[label] = mine_run(features, work / f"mined-{label}", args.mine_budget_mb, work, args.mine_nprobe, args.mine_refine)
        manifest = store.load_split_manifest(features, "train")
        vectors[label] = manifest["num_images"] + manifest["num_texts"]
    largest = list(labels)[-1]
    results["runs"] = runs
    results["database_vectors"] = vectors
    results["mine_rss_ratio"] = runs[largest]["peak_rss_mib"] / runs["N"]["peak_rss_mib"]
    results["bytes_per_database_vector"] = ((runs[largest]["peak_rss_mib"] - runs["N"]["peak_rss_mib"]) * 2**20
                                            / (vectors[largest] - vectors["N"]))
    out = args.out if args.out != ROOT / "benchmarks" / "results" / "memory.json" else args.out.with_name("memory.mine.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"peak RSS of dsmd mine, {largest} / N: {results['mine_rss_ratio']:.3f} (target <= 1.5; indexes "
          f"N {runs['N']['indexes']}, {largest} {runs[largest]['indexes']}); "
          f"{results['bytes_per_database_vector']:.1f} bytes per database vector")


def mine_run(features: Path, out: Path, budget_mb: int, work: Path, nprobe: int = 16, refine: int = 4) -> dict:
    """Peak RSS and time of `dsmd mine` (k 8) over a features split, with the index kinds and recall it reports."""
    run = run_stage("mine", {"mine": {
        "features_dir": str(features), "out_dir": str(out), "splits": ["train"], "k": 8, "query_chunk": 4096,
        "memory_budget_mb": budget_mb, "nprobe": nprobe, "refine_factor": refine, "recall_sample": 200,
        "threads": 2}}, [], work)
    manifest = json.loads((out / "train" / "_manifest.json").read_text())
    run["indexes"] = {db: {key: info[key] for key in ("kind", "ntotal", "nlist", "build_seconds") if key in info}
                      for db, info in manifest["indexes"].items()}
    run["direction_seconds"] = {d: info["seconds"] for d, info in manifest["directions"].items()}
    run["recall_at_k"] = {d: info.get("recall_at_k") for d, info in manifest["directions"].items()}
    print(f"mine {features.name}: {run}", flush=True)
    return run


if __name__ == "__main__":
    main()
