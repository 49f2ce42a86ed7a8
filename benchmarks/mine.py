"""Benchmark `dsmd mine`, measured side by side in one run.

1. Overhead: `pipeline.mining.mine` (Parquet in, four directions with exclusions, Parquet out)
   against bare FAISS search (IndexFlatIP build + one `search(all queries, k)` per direction) on
   the same vectors: ratio mine / bare.
2. Index choice at N database vectors (default 200k, d 256), i2i-style (database = queries):
   exact IndexFlatIP against IVF-Flat, HNSW and IVF-PQ built by `pipeline.mining.build_index`
   with the MineConfig defaults. Each index runs in its own subprocess so that its peak RSS
   (`ru_maxrss`) is its own. Search time is measured on `--sample` queries and scaled to N
   (a full exact pass over 200k x 200k takes minutes on 2 cores); recall@k is against exact
   search on the same sample.

Synthetic clustered unit vectors stand in for teacher embeddings (uniform random vectors in
256-d have no neighbourhood structure, so no approximate index could find anything there).

    .venv/bin/python benchmarks/mine.py                    # ~4-5 minutes on 2 cores
    .venv/bin/python benchmarks/mine.py --n 50000 --overhead-n 5000   # quick
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.features import schema, store  # noqa: E402
from pipeline.common.config import MineConfig  # noqa: E402


def clustered(n: int, dim: int, clusters: int, noise: float, seed: int) -> np.ndarray:
    """Unit vectors around `clusters` random centres; built in float32 blocks (small peak memory)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 4096):  # small blocks: the generator's temporaries must not set the peak RSS
        stop = min(start + 4096, n)
        block = centres[rng.integers(clusters, size=stop - start)] + noise * rng.standard_normal((stop - start, dim), dtype=np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---- part 1: overhead against bare FAISS ------------------------------------------------------

def write_features(features_dir: Path, image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray) -> None:
    n, dim = image_emb.shape
    images = schema.images_table([f"{i:08d}" for i in range(n)], ["bench.tar"] * n, ["png"] * n, [b""] * n, image_emb)
    texts = schema.texts_table(
        text_image, np.zeros(len(text_image), np.int32),
        [f"caption {t} of image {i}" for t, i in enumerate(text_image)], text_emb,
    )
    store.write_split(features_dir, "train", [images], [texts], {"embedding_dim": dim, "embedding_dtype": "float16"})


def overhead(args) -> dict:
    import faiss

    from pipeline.mining import negatives

    n, dim, captions = args.overhead_n, args.dim, args.captions
    image_emb = clustered(n, dim, max(10, n // 200), args.noise, seed=1)
    rng = np.random.default_rng(2)
    text_image = np.repeat(np.arange(n), captions)
    text_emb = image_emb[text_image] + 0.5 * args.noise * rng.standard_normal((len(text_image), dim), dtype=np.float32)
    text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory() as tmp:
        features = Path(tmp) / "features"
        write_features(features, image_emb, text_emb, text_image)
        # bare FAISS gets exactly the vectors mine searches: the float16 shards, re-normalised in float32
        image_emb, text_emb, _ = store.load_embeddings(features, "train")
        image_emb /= np.linalg.norm(image_emb, axis=1, keepdims=True)
        text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)
        if args.threads:
            faiss.omp_set_num_threads(args.threads)

        def bare(chunk: int) -> float:
            """IndexFlatIP build + search of every query, `chunk` queries per call (0 = one call)."""
            t0 = time.perf_counter()
            for queries, database in ((image_emb, text_emb), (text_emb, image_emb), (image_emb, image_emb), (text_emb, text_emb)):
                index = faiss.IndexFlatIP(dim)
                index.add(database)
                step = chunk or len(queries)
                for start in range(0, len(queries), step):
                    index.search(queries[start:start + step], args.k)
            return time.perf_counter() - t0

        def dsmd(run: int) -> float:
            cfg = MineConfig(features_dir=str(features), out_dir=str(Path(tmp) / f"neg{run}"), k=args.k, index="flat",
                             threads=args.threads)
            t0 = time.perf_counter()
            negatives.mine(cfg, progress=False)
            return time.perf_counter() - t0

        # interleaved, best of `repeats` each: the machine may be shared, the minimum is the least disturbed
        times: dict[str, list[float]] = {"bare_one_call": [], "bare_chunked": [], "mine": []}
        for run in range(args.repeats):
            times["bare_one_call"].append(bare(0))
            times["bare_chunked"].append(bare(MineConfig.query_chunk))
            times["mine"].append(dsmd(run))
    return {"n_images": n, "n_texts": len(text_image), "dim": dim, "k": args.k, **{k: min(v) for k, v in times.items()}}


# ---- part 2: exact against approximate, one subprocess per index ------------------------------

def worker(args) -> None:
    """Runs in a subprocess: one index over the N vectors; prints one JSON line."""
    import faiss

    from pipeline.mining import negatives

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    vectors = clustered(args.n, args.dim, args.clusters, args.noise, seed=0)
    sample = np.sort(np.random.default_rng(1).choice(args.n, size=min(args.sample, args.n), replace=False))
    rss_data = current_rss_mb()
    cfg = MineConfig()
    kind = args.worker
    t0 = time.perf_counter()
    index = negatives.build_index(vectors, kind, cfg)
    build_s = time.perf_counter() - t0
    searcher = negatives._IndexSearcher(index, kind, vectors, cfg)
    t0 = time.perf_counter()
    _, ids = negatives.search_chunked(searcher, vectors[sample], args.k, cfg.query_chunk)
    search_s = time.perf_counter() - t0
    rss_peak = maxrss_mb()
    truth_path = Path(args.truth)
    if kind == "flat":
        np.save(truth_path, ids)
        recall = 1.0
    else:
        recall = negatives.recall_at_k(ids, np.load(truth_path))
    extra = {"nlist": int(index.nlist), "nprobe": int(index.nprobe)} if kind in ("ivf", "ivfpq") else {}
    print(json.dumps({"kind": kind, "build_s": build_s, "search_s": search_s, "queries": len(sample),
                      "recall": recall, "rss_data_mb": rss_data, "rss_peak_mb": rss_peak, **extra}))


def index_comparison(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        truth = str(Path(tmp) / "truth.npy")
        for kind in ["flat"] + [k for k in args.indexes if k != "flat"]:
            cmd = [sys.executable, __file__, "--worker", kind, "--truth", truth, "--n", str(args.n), "--dim", str(args.dim),
                   "--k", str(args.k), "--sample", str(args.sample), "--clusters", str(args.clusters),
                   "--noise", str(args.noise), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{kind}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  {kind} done", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000, help="database size of the index comparison")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (recall@k)")
    parser.add_argument("--sample", type=int, default=4000, help="queries timed (and checked for recall) per index")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.06, help="per-dimension noise around the cluster centres")
    parser.add_argument("--indexes", nargs="+", default=["ivf", "hnsw", "ivfpq"])
    parser.add_argument("--overhead-n", type=int, default=15_000, help="images of the overhead run (0 = skip it)")
    parser.add_argument("--captions", type=int, default=2, help="captions per image in the overhead run")
    parser.add_argument("--repeats", type=int, default=2, help="overhead runs per side (best kept)")
    parser.add_argument("--threads", type=int, default=0, help="FAISS threads, 0 = FAISS default")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--truth", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import faiss

    print(f"# dsmd mine benchmark: faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads")
    if args.overhead_n > 0:
        o = overhead(args)
        print(f"\n## overhead: {o['n_images']} images + {o['n_texts']} texts, d={o['dim']}, k={o['k']}, exact, 4 directions, "
              f"best of {args.repeats}")
        print(f"bare FAISS, one search call per direction      {o['bare_one_call']:8.2f} s")
        print(f"bare FAISS, {MineConfig.query_chunk} queries per search call      {o['bare_chunked']:8.2f} s")
        print(f"dsmd mine, end to end (Parquet in and out)      {o['mine']:8.2f} s")
        best = min(o["bare_one_call"], o["bare_chunked"])
        print(f"ratio mine / fastest bare                       {o['mine'] / best:8.3f}  "
              f"(overhead {100 * (o['mine'] / best - 1):+.1f} %; target <= +20 %)")

    rows = index_comparison(args)
    by_kind = {r["kind"]: r for r in rows}
    if "flat" not in by_kind:
        return
    exact = by_kind["flat"]
    per_query = {r["kind"]: r["search_s"] / r["queries"] for r in rows}
    print(f"\n## exact vs approximate: N={args.n}, d={args.dim}, k={args.k}, {args.clusters} clusters, "
          f"search timed on {exact['queries']} queries and scaled to N queries")
    print(f"{'index':6} {'build s':>8} {'search N q, s':>14} {'total s':>9} {'speed-up':>9} {'recall@k':>9} "
          f"{'peak RSS MB':>12} {'over data MB':>13}  params")
    for r in rows:
        full = per_query[r["kind"]] * args.n
        total = r["build_s"] + full
        exact_total = exact["build_s"] + per_query["flat"] * args.n
        params = ", ".join(f"{k}={r[k]}" for k in ("nlist", "nprobe") if k in r)
        print(f"{r['kind']:6} {r['build_s']:8.1f} {full:14.1f} {total:9.1f} {exact_total / total:8.1f}x "
              f"{r['recall']:9.4f} {r['rss_peak_mb']:12.0f} {r['rss_peak_mb'] - r['rss_data_mb']:13.0f}  {params}")


if __name__ == "__main__":
    main()
