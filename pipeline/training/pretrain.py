"""The demo teacher, made once and shipped as users download theirs (`dsmd pretrain`).

A real teacher (ViT-L-14/openai, a LAION model) has seen ~10^5 times the student's target data; that gap is
what distillation transfers. The demo teacher stands in for it: `teacher.model` trained with the CLIP loss by
the students' own loop on `pretrain.world_images` fresh scenes of the synthetic world, rendered in the
loader workers (no tars), then written as an open_clip `local-dir:` folder with a card. `pretrained: demo`
resolves to that folder; the default pipeline never pretrains.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import platform
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from pipeline import models
from pipeline.common import atomic, names
from pipeline.common.config import CorpusConfig, to_dict
from pipeline.common.errors import PipelineError
from pipeline.common.params import PretrainConfig, TrainConfig
from pipeline.corpus import synthetic
from pipeline.training import data, loop

log = logging.getLogger(__name__)

UNMASKED_DIR = "unmasked"  # the tuning's run folder, inside pretrain.work_dir


class PretrainError(PipelineError):
    """A pretraining that cannot start (a source folder that is not a demo teacher's)."""


def load_world_data(world: CorpusConfig, num_images: int, first: int = 0) -> data.TrainingData:
    """The synthetic world's scenes first .. first + num_images - 1 as a split, rendered per sample in the loader
    workers (synthetic.WorldStream): images are PIL images, not bytes, which TrainingDataset takes as they are."""
    images, captions, text_to_image = synthetic.world_sequences(world, first + num_images)
    per_image = len(captions) // len(images)
    return data.TrainingData(source=f"world {synthetic.WORLD_NAME} v{synthetic.WORLD_VERSION} (seed {world.seed}, "
                             f"scenes {first}..{first + num_images - 1})", image_bytes=_Window(images, first, num_images),
                             captions=_Window(captions, first * per_image, num_images * per_image),
                             text_to_image=text_to_image[:num_images * per_image])


class _Window:
    """Items start .. start + length - 1 of a sequence, indexed from 0."""

    def __init__(self, items, start: int, length: int) -> None:
        self.items, self.start, self.length = items, start, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.items[self.start + int(index)]


def pretrain_config(cfg: PretrainConfig, model: str) -> TrainConfig:
    """The CLIP-loss training run of the demo teacher `model` (the baseline students' loop, source world)."""
    return TrainConfig(model=model, loss="clip", source="world", split="world", out_dir=cfg.work_dir,
                       live_dir="", val_every=0, optim=dataclasses.replace(cfg.optim))


def unmasked_config(cfg: PretrainConfig, model: str, weights: str) -> TrainConfig:
    """The unmasked tuning of `weights`: pretrain.optim with the tuning's rate and warmup, patch dropout off."""
    optim = dataclasses.replace(cfg.optim, lr=cfg.unmasked.lr, warmup_steps=cfg.unmasked.warmup_steps)
    return dataclasses.replace(pretrain_config(cfg, model), pretrained=weights, force_patch_dropout=0.0, optim=optim,
                               out_dir=str(Path(cfg.work_dir) / UNMASKED_DIR))


def pretrain_teacher(cfg: PretrainConfig, model: str, world: CorpusConfig, resume: bool = False,
                     unmasked_from: Optional[Path] = None) -> Path:
    """Pretrain `model` on the world, tune it unmasked (pretrain.unmasked), and write the shipped folder
    `cfg.out_dir`; returns it. `unmasked_from`: a demo folder whose weights are tuned instead of pretraining anew
    (its card becomes the pretraining's record)."""
    if unmasked_from is None:
        run = pretrain_config(cfg, model)
        log.info("pretraining the demo teacher %s on %d fresh scenes of world %s v%d", model,
                 cfg.world_images, synthetic.WORLD_NAME, synthetic.WORLD_VERSION)
        summary = loop.train(run, resume=resume, world=load_world_data(world, cfg.world_images))
        weights = str(Path(run.out_dir) / names.WEIGHTS_FILE)
        phases = [_phase("pretraining", summary, run, 0, source=None)]
    else:
        if not cfg.unmasked.images:
            raise PretrainError("--unmasked-from tunes an existing teacher: set pretrain.unmasked.images > 0")
        source = models.demo_card(str(unmasked_from / names.SAFETENSORS_FILE))
        if source is None:
            raise PretrainError(f"{unmasked_from}: no {names.DEMO_CARD} beside {names.SAFETENSORS_FILE} (a demo folder "
                                "written by `dsmd pretrain`)")
        weights = str(unmasked_from / names.SAFETENSORS_FILE)
        phases = source.get("phases") or [{"phase": "pretraining", **{k: source[k] for k in CARD_RUN_KEYS if k in source}}]
    if cfg.unmasked.images:
        run = unmasked_config(cfg, model, weights)
        log.info("unmasked tuning on %d further scenes (patch dropout off)", cfg.unmasked.images)
        summary = loop.train(run, resume=resume, world=load_world_data(world, cfg.unmasked.images, first=cfg.world_images))
        phases.append(_phase("unmasked tuning", summary, run, cfg.world_images, source=atomic.sha256_file(weights)))
        if unmasked_from is not None:  # how this phase alone was run (the card's command runs both)
            phases[-1]["command"] = f"dsmd pretrain --params params.yaml --unmasked-from {unmasked_from}"
        weights = str(Path(run.out_dir) / names.WEIGHTS_FILE)
    trained = models.load_model(model, weights)
    card = {
        "model": model,
        "world": synthetic.world_record(world),
        "world_seed": world.seed,
        "samples_seen": sum(p["samples_seen"] for p in phases),
        "steps": sum(p["steps"] for p in phases),
        "wall_time_s": round(sum(p["wall_time_s"] for p in phases), 1),
        "phases": phases,
        "command": "dsmd pretrain --params params.yaml",
        "config": {"pretrain": to_dict(cfg), "world": {k: v for k, v in dataclasses.asdict(world).items()
                                                      if k not in synthetic.NOT_CONTENT_FIELDS}},
    }
    return write_demo_folder(trained.model, model, Path(cfg.out_dir), card)


# what a phase of the card records (an older card without phases records its one pretraining with these keys)
CARD_RUN_KEYS = ("samples_seen", "steps", "wall_time_s", "machine", "command", "sha256", "config")


def _phase(name: str, summary: dict, run: TrainConfig, first_scene: int, source: Optional[str]) -> dict:
    phase = {"phase": name, "first_scene": first_scene, "samples_seen": summary["steps"] * run.optim.batch_size,
             "steps": summary["steps"], "wall_time_s": round(summary["wall_time_s"], 1),
             "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {torch.get_num_threads()} threads"}
    if source is not None:
        phase["from_sha256"] = source
    return phase


def write_demo_folder(model: torch.nn.Module, model_name: str, out_dir: Path, card: dict) -> Path:
    """safetensors + open_clip_config.json (open_clip's `local-dir:` layout) + card.json with the weights' sha256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out_dir / (names.SAFETENSORS_FILE + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(out_dir / names.SAFETENSORS_FILE)
    config = {"model_name": model_name, "model_cfg": models.model_config(model_name),
              "preprocess_cfg": dict(getattr(model.visual, "preprocess_cfg", {}) or {})}
    atomic.atomic_write_json(config, out_dir / names.OPEN_CLIP_CONFIG)
    card = {**card, "weights": names.SAFETENSORS_FILE, "sha256": atomic.sha256_file(out_dir / names.SAFETENSORS_FILE)}
    atomic.atomic_write_json(card, out_dir / names.DEMO_CARD)
    log.info("demo teacher written to %s (%s)", out_dir, json.dumps({k: card[k] for k in ("samples_seen", "sha256")}))
    return out_dir
