"""One factory for every open_clip model the pipeline touches: teacher, students, demo teacher.

`load_model` resolves a model name plus a `pretrained` value (an open_clip tag, an `hf-hub:` id,
a `local-dir:` folder, a local checkpoint file, or "" for random weights) and returns the model
with its own tokenizer and preprocessing, and an identity record that is written into every
output so that features from different teachers are never mixed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import open_clip
import torch

from pipeline.common import atomic, names
from pipeline.common.errors import PipelineError

# Teachers' configs (a dependency of stage one) apart from the students' (of stage two only): editing a
# student's architecture must never make DVC re-run the teacher pass.
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
STUDENT_CONFIG_DIR = Path(__file__).parent / "student_configs"
PRETRAINED_DIR = Path(__file__).parent / "pretrained"  # shipped demo weights, one open_clip local-dir folder a model

_registered = False


class ModelError(PipelineError):
    """A model name or checkpoint that cannot be resolved; the message says which and why."""


def register_model_configs() -> None:
    """Make the in-repo configs (demo teacher, students, test models) known to open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        open_clip.add_model_config(STUDENT_CONFIG_DIR)
        _registered = True


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess: Callable  # eval transform: PIL image -> tensor
    train_preprocess: Callable  # training transform (random resized crop etc.)
    tokenizer: Callable  # list[str] -> LongTensor
    identity: dict
    embed_dim: int
    image_size: int


def demo_dir(model_name: str) -> Path:
    """Where `pretrained: demo` finds `model_name`'s shipped weights (written by `dsmd pretrain`)."""
    return PRETRAINED_DIR / model_name


def resolve_pretrained(pretrained: str, model_name: str = "") -> str:
    """Map `pretrained` to what open_clip takes: `demo` -> the shipped demo weights of `model_name`."""
    if pretrained == "demo":
        path = demo_dir(model_name) / names.SAFETENSORS_FILE
        if not path.is_file():
            raise ModelError(f"no demo weights for {model_name!r} at {path}: ship them with `dsmd pretrain` "
                             f"(shipped: {sorted(p.name for p in PRETRAINED_DIR.glob('*/') if p.is_dir())})")
        return str(path)
    return pretrained


def demo_card(weights: str) -> dict | None:
    """The card beside a demo teacher's weights (a file or a `local-dir:` folder): samples seen, world, sha256."""
    if not weights:
        return None
    folder = Path(weights[len("local-dir:"):]) if weights.startswith("local-dir:") else Path(weights).parent
    card = folder / names.DEMO_CARD
    data = json.loads(card.read_text()) if card.is_file() else None
    return data if isinstance(data, dict) and isinstance(data.get("world"), dict) else None


def check_world(identity: dict, world: dict | None, where: str) -> None:
    """A teacher pretrained on the synthetic world understands only its version: refuse another's corpus."""
    trained_on = identity.get("world")
    if not trained_on or not world:
        return
    same = (trained_on.get("name"), trained_on.get("version")) == (world.get("name"), world.get("version"))
    if same and trained_on.get("fingerprint") and world.get("fingerprint"):
        same = trained_on["fingerprint"] == world["fingerprint"]  # the generator changed without a version bump
    if not same:
        raise ModelError(
            f"{where} is world {world.get('name')} v{world.get('version')}, but the teacher {identity.get('model')} was "
            f"pretrained on {trained_on.get('name')} v{trained_on.get('version')}: regenerate the corpus with this "
            f"code's generator, or pretrain a teacher on this world (`dsmd pretrain`)")


def _preprocess_description(model: torch.nn.Module) -> dict:
    cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {}
    size = cfg.get("size")
    return {
        "image_size": list(size) if isinstance(size, (tuple, list)) else size,
        "mean": list(cfg.get("mean", ())),
        "std": list(cfg.get("std", ())),
        "interpolation": cfg.get("interpolation"),
        "resize_mode": cfg.get("resize_mode"),
    }


def model_identity(model_name: str, pretrained: str, model: torch.nn.Module, embed_dim: int) -> dict:
    """What makes two sets of embeddings comparable: recorded in every Parquet file."""
    weights: dict[str, Any]
    if pretrained and os.path.isfile(pretrained):
        weights = {"checkpoint_sha256": atomic.sha256_file(pretrained)}
    elif pretrained.startswith("local-dir:") or model_name.startswith("local-dir:"):
        folder = Path((model_name if model_name.startswith("local-dir:") else pretrained)[len("local-dir:"):])
        ckpt = next((p for p in sorted(folder.iterdir()) if p.suffix in (".bin", ".safetensors", ".pth")), None)
        weights = {"checkpoint_sha256": atomic.sha256_file(ckpt) if ckpt else None}
    else:
        weights = {"pretrained_tag": pretrained or None}
    return {
        "model": model_name,
        "pretrained": pretrained or None,
        **weights,
        "weights_sha256": weights_sha256(model),
        "preprocess": _preprocess_description(model),
        "embed_dim": embed_dim,
        "open_clip_version": open_clip.__version__,
    }


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the weights actually loaded (every state-dict tensor's name, dtype, shape and bytes): two
    random-weight teachers, or a tag whose weights changed upstream, are two teachers. About a second per GB."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


# Identity fields that say how the weights were named, not what they are: weights are identified by their
# sha256, so "demo", a relative and an absolute path to them are the same teacher.
NAMING_KEYS = ("pretrained", "pretrained_source")


def comparable_identity(identity: dict) -> dict:
    if identity.get("weights_sha256") or identity.get("checkpoint_sha256"):
        return {k: v for k, v in identity.items() if k not in NAMING_KEYS}
    return {k: v for k, v in identity.items() if k != "pretrained_source"}


def _embed_dim(model: torch.nn.Module) -> int:
    visual = model.visual
    if hasattr(visual, "output_dim"):
        return int(visual.output_dim)
    with torch.no_grad():
        size = visual.image_size if hasattr(visual, "image_size") else 224
        size = size[0] if isinstance(size, (tuple, list)) else size
        return int(model.encode_image(torch.zeros(1, 3, size, size)).shape[-1])


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _random_init_expected(expected: bool):
    """open_clip warns on the root logger when a model starts from random weights; for a student (or a test
    model) that is the intended start, so say nothing then. Any other warning still shows."""
    if not expected:
        yield
        return
    root, quiet = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def load_model(model_name: str, pretrained: str = "", device: str | torch.device = "cpu",
               image_mean: Sequence[float] = (), image_std: Sequence[float] = (),
               force_patch_dropout: float | None = None) -> LoadedModel:
    """Create an open_clip model with weights from `pretrained` (already resolved, see resolve_pretrained);
    `image_mean` / `image_std` override its input normalisation (open_clip's force_preprocess_cfg),
    `force_patch_dropout` its image tower's patch dropout in training (open_clip's own option)."""
    register_model_configs()
    pretrained = pretrained or ""
    if pretrained.startswith("local-dir:") or pretrained.startswith("hf-hub:"):
        # open_clip takes these schemas as the model name; the config comes with them
        model_name, pretrained = pretrained, ""
    schema_name = model_name.startswith(("hf-hub:", "local-dir:"))
    if not schema_name and model_name.replace("/", "-") not in open_clip.list_models():
        raise ModelError(
            f"unknown open_clip model {model_name!r}; in-repo configs: "
            f"{sorted(p.stem for d in (MODEL_CONFIG_DIR, STUDENT_CONFIG_DIR) for p in d.glob('*.json'))}, "
            f"or any of open_clip.list_models()"
        )
    if pretrained and not schema_name and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise ModelError(
                f"pretrained {pretrained!r} for {model_name!r} is neither a file nor a known tag {tags}"
            )
    try:
        with _random_init_expected(not pretrained):
            model, train_preprocess, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained or None, device=device, weights_only=True,
                image_mean=tuple(image_mean) or None, image_std=tuple(image_std) or None,
                force_patch_dropout=force_patch_dropout,
            )
    except (RuntimeError, ValueError, OSError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        # a foreign or damaged weights file fails deep in torch/pickle: name it
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        if pretrained and os.path.isfile(pretrained):
            raise ModelError(f"{pretrained}: not a weights file for {model_name!r} ({type(exc).__name__}: {reason})") from None
        raise ModelError(f"could not create {model_name!r} with pretrained={pretrained!r}: {reason}") from None
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    embed_dim = _embed_dim(model)
    size = model.visual.preprocess_cfg.get("size", 224) if hasattr(model.visual, "preprocess_cfg") else 224
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        train_preprocess=train_preprocess,
        tokenizer=tokenizer,
        identity=model_identity(model_name, pretrained, model, embed_dim),
        embed_dim=embed_dim,
        image_size=size,
    )


def model_config(model_name: str) -> dict:
    register_model_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ModelError(f"no open_clip config named {model_name!r}")
    return cfg


def save_open_clip_dir(model: torch.nn.Module, model_name: str, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write weights + `open_clip_config.json` so that both `open_clip.create_model(model_name,
    pretrained=<dir>/open_clip_pytorch_model.bin)` and `create_model('local-dir:<dir>')` load it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic.atomic_torch_save(state, out_dir / names.WEIGHTS_FILE)
    config = {
        "model_name": model_name,
        "model_cfg": model_config(model_name),
        "preprocess_cfg": dict(getattr(model.visual, "preprocess_cfg", {}) or {}),
        **(extra or {}),
    }
    atomic.atomic_write_json(config, out_dir / names.OPEN_CLIP_CONFIG)
    return out_dir / names.WEIGHTS_FILE


def read_json_object(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read {what} ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: {what} must be a JSON object")
    return data


def load_student(student_dir: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """A student written by `save_open_clip_dir` (the reader beside its writer): `open_clip_config.json` names the model config,
    `open_clip_pytorch_model.bin` holds the weights (loaded with weights_only=True)."""
    student_dir = Path(student_dir)
    config_path, weights = student_dir / names.OPEN_CLIP_CONFIG, student_dir / names.WEIGHTS_FILE
    for path in (config_path, weights):
        if not path.exists():
            raise ModelError(f"student {student_dir}: {path.name} not found (train the student first)")
    config = read_json_object(config_path, "the student's open_clip config")
    model_name = config.get("model_name")
    if not model_name:
        raise ModelError(f"{config_path}: no 'model_name'")
    preprocess = config.get("preprocess_cfg") or {}  # the normalisation it was trained with (train.image_mean)
    try:
        return load_model(model_name, str(weights), device, preprocess.get("mean", ()), preprocess.get("std", ()))
    except ModelError as known_name_failed:
        # a config not registered here (trained elsewhere): open_clip reads it from the folder itself
        try:
            return load_model(f"local-dir:{student_dir}", "", device)
        except ModelError:
            raise ModelError(f"student {student_dir}: {known_name_failed}") from None


def load_identity_file(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def load_teacher(cfg, device: str | torch.device = "cpu") -> LoadedModel:
    """The teacher of `cfg` (pipeline.config.TeacherConfig): its open_clip model with the weights
    `teacher.pretrained` names (`demo` = the shipped demo weights of `teacher.model`)."""
    weights = resolve_pretrained(cfg.pretrained, cfg.model)
    loaded = load_model(cfg.model, weights, device=device)
    loaded.identity["pretrained_source"] = cfg.pretrained or None
    # the card sits beside the weights file, or in a `local-dir:` model's folder; a plain model name has none
    # (Path("ViT-B-32").parent would be the working directory, and a card.json there is not this model's)
    card = demo_card(weights if cfg.pretrained else (cfg.model if cfg.model.startswith("local-dir:") else ""))
    if card is not None:
        loaded.identity["world"] = card["world"]
    return loaded
