"""Encoder cost, measured side by side: parameters, batch-1 latency and large-batch throughput of the
teacher's and the students' towers in the same process, with the same threads, interleaving the models
so that machine noise hits all of them alike."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from pipeline.common import runtime
from pipeline.common.progress import progress
from pipeline.models import LoadedModel

# Caption used to time the text encoders; tokenizers pad to the context length, so its content
# does not change the cost.
TIMING_CAPTION = "a small red cube to the left of a large blue sphere on a wooden table"


def parameter_counts(model: torch.nn.Module) -> dict:
    """Image tower = `model.visual`; text tower = everything else except the logit scale/bias."""
    total = sum(p.numel() for p in model.parameters())
    image = sum(p.numel() for p in model.visual.parameters())
    head = sum(p.numel() for name, p in model.named_parameters() if name in ("logit_scale", "logit_bias"))
    return {"params_image": int(image), "params_text": int(total - image - head), "params_total": int(total)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def compare_encoder_costs(
    models: dict[str, LoadedModel],
    device: str | torch.device = "cpu",
    latency_repeats: int = 20,
    throughput_batch: int = 64,
    throughput_repeats: int = 5,
    warmup: int = 2,
) -> dict[str, dict]:
    """`encoder_cost` of several models measured together: every repeat times every model in turn
    (in a rotating order), so drift in machine load affects all of them alike.

    Per model: parameter counts; `image_latency_ms` / `text_latency_ms` = median wall time of one
    `encode_image` / `encode_text` call at batch 1; `image_throughput` / `text_throughput` =
    throughput_batch / median time of a call at that batch (items per second), and
    `image_ms_per_image` / `text_ms_per_text` = 1000 / throughput."""
    device = torch.device(device)
    names = list(models)
    ops: dict[str, dict[str, Callable[[], object]]] = {}
    for name, loaded in models.items():
        model = loaded.model.to(device).eval()
        size = loaded.image_size
        image_1 = torch.randn(1, 3, size, size, device=device)
        image_b = torch.randn(throughput_batch, 3, size, size, device=device)
        text_1 = loaded.tokenizer([TIMING_CAPTION]).to(device)
        text_b = loaded.tokenizer([TIMING_CAPTION] * throughput_batch).to(device)
        ops[name] = {
            "image_1": lambda m=model, x=image_1: m.encode_image(x),
            "text_1": lambda m=model, x=text_1: m.encode_text(x),
            "image_b": lambda m=model, x=image_b: m.encode_image(x),
            "text_b": lambda m=model, x=text_b: m.encode_text(x),
        }
    times: dict[str, dict[str, list[float]]] = {n: {op: [] for op in ops[n]} for n in names}
    rounds = max(latency_repeats, throughput_repeats)
    with torch.inference_mode(), runtime.autocast(device):
        for name in names:
            for fn in ops[name].values():
                for _ in range(warmup):
                    fn()
        with progress(rounds, "timing encoders", "round") as bar:
            for r in range(rounds):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    for op in ("image_1", "text_1"):
                        if r < latency_repeats:
                            times[name][op].append(_seconds(ops[name][op], device))
                    for op in ("image_b", "text_b"):
                        if r < throughput_repeats:
                            times[name][op].append(_seconds(ops[name][op], device))
                bar.update(1)
    costs = {}
    for name in names:
        t = {op: statistics.median(values) for op, values in times[name].items()}
        image_throughput = throughput_batch / t["image_b"]
        text_throughput = throughput_batch / t["text_b"]
        costs[name] = {
            **parameter_counts(models[name].model),
            "image_size": int(models[name].image_size),
            "image_latency_ms": 1000.0 * t["image_1"],
            "text_latency_ms": 1000.0 * t["text_1"],
            "image_throughput": image_throughput,
            "text_throughput": text_throughput,
            "image_ms_per_image": 1000.0 / image_throughput,
            "text_ms_per_text": 1000.0 / text_throughput,
            "throughput_batch": int(throughput_batch),
        }
    return costs


def encoder_cost(
    loaded: LoadedModel,
    device: str | torch.device = "cpu",
    latency_repeats: int = 20,
    throughput_batch: int = 64,
    throughput_repeats: int = 5,
) -> dict:
    """Parameters, batch-1 latency (ms) and throughput (items/s) of one model; see compare_encoder_costs."""
    return compare_encoder_costs(
        {"model": loaded}, device, latency_repeats, throughput_batch, throughput_repeats
    )["model"]


