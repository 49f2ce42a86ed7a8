"""onnxruntime against PyTorch for the exported student, on the CPU, side by side in one run.

    python benchmarks/export_latency.py [--params params.yaml] [--threads 2] [--rounds 30] [--batch 64]

Needs `dvc repro` (or `dsmd export`) first: it reads export.out_dir. Both runtimes get the same thread
count and the same inputs; rounds interleave them (PyTorch, onnxruntime, onnxruntime, PyTorch, ...) so
machine noise hits both alike. Prints, per tower, the median batch-1 latency and the throughput at
--batch, and the ratio onnxruntime / PyTorch; writes benchmarks/results/export_latency.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.common.params import load_params  # noqa: E402
from pipeline.models import load_student  # noqa: E402
from pipeline.common import names  # noqa: E402


def _time(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    import onnxruntime as ort

    cfg = load_params(args.params).export
    out_dir = Path(cfg.out_dir)
    student = load_student(cfg.student_dir)
    torch.set_num_threads(args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    size = student.image_size
    captions = [f"a small red striped circle number {i} in the top left" for i in range(args.batch)]
    inputs = {
        "image": {1: torch.randn(1, 3, size, size), args.batch: torch.randn(args.batch, 3, size, size)},
        "text": {1: student.tokenizer(captions[:1]), args.batch: student.tokenizer(captions)},
    }
    model = student.model.eval()
    runners = {}
    for tower, name in (("image", names.IMAGE_ONNX), ("text", names.TEXT_ONNX)):
        session = ort.InferenceSession(str(out_dir / name), options, providers=["CPUExecutionProvider"])
        encode = model.encode_image if tower == "image" else model.encode_text
        for batch, x in inputs[tower].items():
            feed = {tower: x.numpy()}
            runners[(tower, batch, "pytorch")] = lambda encode=encode, x=x: encode(x, normalize=True)
            runners[(tower, batch, "onnxruntime")] = lambda session=session, feed=feed: session.run(None, feed)
    times: dict = {key: [] for key in runners}
    with torch.inference_mode():
        for fn in runners.values():  # warm-up
            fn()
        for r in range(args.rounds):
            order = list(runners) if r % 2 == 0 else list(reversed(list(runners)))
            for key in order:
                times[key].append(_time(runners[key]))
    result = {"threads": args.threads, "rounds": args.rounds, "batch": args.batch, "towers": {}}
    print(f"{'tower':6s} {'batch':>5s} {'pytorch ms':>11s} {'onnxrt ms':>10s} {'ort/pt':>7s}  (median of {args.rounds} rounds, {args.threads} threads)")
    for tower in ("image", "text"):
        for batch in (1, args.batch):
            pt = statistics.median(times[(tower, batch, "pytorch")]) * 1e3
            ox = statistics.median(times[(tower, batch, "onnxruntime")]) * 1e3
            spread = [float(np.percentile(np.array(times[(tower, batch, k)]) * 1e3, q)) for k in ("pytorch", "onnxruntime") for q in (25, 75)]
            result["towers"][f"{tower}_batch{batch}"] = {
                "pytorch_ms": pt, "onnxruntime_ms": ox, "ratio_onnxruntime_to_pytorch": ox / pt,
                "pytorch_items_per_s": batch / pt * 1e3, "onnxruntime_items_per_s": batch / ox * 1e3,
                "iqr_ms": {"pytorch": spread[:2], "onnxruntime": spread[2:]},
            }
            print(f"{tower:6s} {batch:5d} {pt:11.3f} {ox:10.3f} {ox / pt:7.3f}")
    path = Path(args.out) / "export_latency.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
