"""Training from the cache against online distillation, and the Parquet loader against the student.

    python benchmarks/train.py [--images 512] [--batch-size 128] [--epochs 2] [--threads 2] [--num-workers 2]
                               [--teacher dsmd-demo-teacher] [--student dsmd-tiny-student]

On the default configs (student `train.model`, teacher `teacher.model`, random weights: timing only):
1. seconds per epoch of DSMD training from the cached features (`dsmd train`'s step) against the same
   student and losses with the teacher's forward pass in the loop (what open_clip's `--distill` does);
   target cache >= 5x faster;
2. samples/s of the training DataLoader alone (decode, preprocess, tokenise, id lookups) against the
   student's training throughput on pre-loaded batches; target loader >= 3x.
Both sides of each ratio run in this one process, alternating, best round of each.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import models
from pipeline.common.config import CorpusConfig, ExtractConfig, TeacherConfig
from pipeline.common.params import TrainConfig
from pipeline.corpus.augment import decode_image
from pipeline.corpus.synthetic import generate_corpus
from pipeline.features import extract as extract_mod
from pipeline.training import data as data_mod, loop


class OnlineDataset(data_mod.TrainingDataset):
    """The training dataset plus what the teacher needs to run in the loop: its own preprocessing
    of the same image and its own tokens of the same caption."""

    def __init__(self, *args, teacher: models.LoadedModel, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher

    def __getitems__(self, keys):
        batch = super().__getitems__(keys)
        batch["teacher_pixels"] = torch.stack([self.teacher.preprocess(decode_image(self.data.image_bytes[int(k[1])])) for k in keys])
        batch["teacher_tokens"] = self.teacher.tokenizer([self.data.captions[t] for t in batch[data_mod.TEXT_ID].tolist()])
        return batch


def make_loader(dataset, image_ids, batch_size, steps, num_workers, seed=0):
    sampler = data_mod.GlobalBatchSampler(image_ids, batch_size, steps, seed=seed)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=data_mod.keep_batch)


def run_epochs(ctx: loop.StepContext, loader, teacher: models.LoadedModel | None = None) -> float:
    """Seconds for every step of `loader`; with `teacher`, its embeddings are computed in the loop."""
    started = time.perf_counter()
    for batch in loader:
        if teacher is not None:
            with torch.no_grad():
                batch[data_mod.TEACHER_IMAGE] = F.normalize(teacher.model.encode_image(batch["teacher_pixels"]), dim=-1)
                batch[data_mod.TEACHER_TEXT] = F.normalize(teacher.model.encode_text(batch["teacher_tokens"]), dim=-1)
        loop.optimizer_step(ctx, [batch])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers of the loader-only measurement")
    parser.add_argument("--train-workers", type=int, default=0, help="DataLoader workers while training (both sides)")
    parser.add_argument("--teacher", default=TeacherConfig.model, help="open_clip teacher config (random weights)")
    parser.add_argument("--student", default=TrainConfig.model, help="open_clip student config")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_cfg, teacher_cfg = TrainConfig(model=args.student), TeacherConfig(model=args.teacher, pretrained="")
    train_cfg = dataclasses.replace(train_cfg, optim=dataclasses.replace(train_cfg.optim, batch_size=args.batch_size, warmup_steps=1))
    work = Path(tempfile.mkdtemp(prefix="dsmd-bench-train-"))
    try:
        manifest = generate_corpus(CorpusConfig(out_dir=str(work / "corpus"), train_images=args.images, val_images=0,
                                                test_images=0, samples_per_shard=args.images))
        extract_mod.extract(ExtractConfig(manifest=str(manifest), out_dir=str(work / "features"), splits=["train"],
                                          threads=args.threads, num_workers=0), teacher_cfg)
        data = data_mod.load_shards_data(work / "features", "train")
        teacher = models.load_model(teacher_cfg.model, "")
        image_ids = data.trainable_image_ids()
        steps_per_epoch = len(image_ids) // args.batch_size
        steps = steps_per_epoch * args.epochs
        cpu = torch.device("cpu")
        # hard negatives in-batch only on both sides: online distillation has no mined cache to look up
        cfg = dataclasses.replace(train_cfg, distill=dataclasses.replace(train_cfg.distill, hard_negatives=0))
        student, _ = loop.build_context(cfg, data.embedding_dim, steps, cpu)
        cached_set = data_mod.TrainingDataset(data, student.preprocess, student.tokenizer)
        online_set = OnlineDataset(data, student.preprocess, student.tokenizer, teacher=teacher)

        def fresh_context() -> loop.StepContext:
            _, ctx = loop.build_context(cfg, data.embedding_dim, steps, cpu)
            loop._prefill_queue(ctx.dsmd_loss, data, image_ids, 0, cpu)
            return ctx

        cached_s, online_s, loader_s, compute_s = [], [], [], []
        for _ in range(args.rounds):
            cached_s.append(run_epochs(fresh_context(), make_loader(cached_set, image_ids, args.batch_size, steps, args.train_workers)))
            online_s.append(run_epochs(fresh_context(), make_loader(online_set, image_ids, args.batch_size, steps, args.train_workers), teacher))
            # the loader alone in steady state (timed from its first batch: worker start-up is paid once
            # per run), and the student's steps on batches already in memory
            loader_iter = iter(make_loader(cached_set, image_ids, args.batch_size, steps + 1, args.num_workers))
            batches = [next(loader_iter)]
            started = time.perf_counter()
            batches += list(loader_iter)
            loader_s.append(time.perf_counter() - started)
            batches = batches[1:]
            ctx = fresh_context()
            started = time.perf_counter()
            for batch in batches:
                loop.optimizer_step(ctx, [batch])
            compute_s.append(time.perf_counter() - started)

        samples = steps * args.batch_size
        cached, online, loader, compute = (min(x) / args.epochs for x in (cached_s, online_s, loader_s, compute_s))
        print(f"data: {len(image_ids)} synthetic images; student {cfg.model} ({student.image_size}px, embed {student.embed_dim}); "
              f"teacher {teacher_cfg.model} ({teacher.image_size}px, embed {teacher.embed_dim}); batch {args.batch_size}; "
              f"threads {args.threads}")
        print(f"per epoch from the cache (load + step, {args.train_workers} workers): {cached:.2f} s")
        print(f"per epoch online (teacher forward in the loop):   {online:.2f} s")
        ratio = online / cached
        print(f"speed-up cache vs online = {ratio:.2f}x  (target >= 5x: {'met' if ratio >= 5 else 'MISSED'})")
        per_epoch_samples = samples / args.epochs
        loader_rate, compute_rate = per_epoch_samples / loader, per_epoch_samples / compute
        print(f"loader alone ({args.num_workers} worker(s)): {loader_rate:.0f} samples/s; "
              f"student training steps alone: {compute_rate:.0f} samples/s")
        feed = loader_rate / compute_rate
        print(f"loader / training throughput = {feed:.2f}x  (target >= 3x: {'met' if feed >= 3 else 'MISSED'})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
