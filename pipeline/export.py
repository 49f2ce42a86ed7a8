"""`dsmd export`: the trained student the way it will be used.

Writes into `export.out_dir`:
- `open_clip_model.safetensors` + `open_clip_config.json` (open_clip's own `save_config_for_hf` format),
  loadable with `open_clip.create_model_and_transforms("local-dir:<out_dir>")` and ready for the hub;
- `image_encoder.onnx`, `text_encoder.onnx`: the towers with a dynamic batch axis, each returning the
  L2-normalised embedding (what retrieval compares);
- `README.md`: a model card generated from the run (teacher, corpus, params, metrics, how to load);
- `export_report.json`: the checks, measured on real images and captions of the features' test split:
  the reloaded safetensors student against the trained one, onnxruntime against PyTorch.
A check that fails is an error: nothing is exported that does not reproduce the student.
"""
from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import open_clip
import torch

from pipeline import models
from pipeline.common import atomic, names
from pipeline.common.params import ExportConfig
from pipeline.common.errors import PipelineError
from pipeline.corpus.augment import decode_image
from pipeline.features import schema, store
from pipeline.models import load_student

log = logging.getLogger(__name__)



class ExportError(PipelineError):
    """An export whose checks fail, or whose inputs are missing; the message names the file."""


class _Tower(torch.nn.Module):
    """One tower of an open_clip model as a module of its own, returning normalised embeddings."""

    def __init__(self, model: torch.nn.Module, tower: str):
        super().__init__()
        self.model, self.tower = model, tower

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        encode = self.model.encode_image if self.tower == "image" else self.model.encode_text
        return encode(inputs, normalize=True)


def write_open_clip_dir(loaded: models.LoadedModel, model_name: str, out_dir: Path) -> None:
    """safetensors weights and open_clip's hub config (model_cfg + preprocess_cfg)."""
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()}
    atomic.atomic_write_with(out_dir / names.SAFETENSORS_FILE, lambda tmp: save_file(state, str(tmp)))
    atomic.atomic_write_with(out_dir / names.OPEN_CLIP_CONFIG,
                             lambda tmp: save_config_for_hf(loaded.model, Path(tmp), models.model_config(model_name)))


def export_onnx(loaded: models.LoadedModel, out_dir: Path, opset: int) -> None:
    """Both towers to ONNX with a dynamic batch axis (TorchScript exporter: no onnxscript needed)."""
    size = loaded.image_size
    examples = {"image": torch.zeros(2, 3, size, size), "text": loaded.tokenizer(["a photo", "two shapes"])}
    for tower, name in (("image", names.IMAGE_ONNX), ("text", names.TEXT_ONNX)):
        module = _Tower(loaded.model.eval(), tower)
        with warnings.catch_warnings():
            # the TorchScript exporter's deprecation notice, and its advice about negative indices (the text
            # tower indexes the end-of-text token with argmax, never negative): the checks below measure the graphs
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=UserWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            atomic.atomic_write_with(out_dir / name, lambda tmp: torch.onnx.export(
                module, (examples[tower],), str(tmp), input_names=[tower], output_names=["embedding"],
                dynamic_axes={tower: {0: "batch"}, "embedding": {0: "batch"}}, opset_version=opset, dynamo=False,
            ))


def _check_data(cfg: ExportConfig) -> tuple[list[bytes], list[str]]:
    """The first `check_images` test images (encoded bytes) and captions the checks compare on."""
    images = store.image_bytes(cfg.features_dir, cfg.split, cfg.check_images)
    captions = store.read_texts(cfg.features_dir, cfg.split, columns=[schema.CAPTION]).slice(0, cfg.check_images)
    return [images[i] for i in range(len(images))], captions[schema.CAPTION].to_pylist()


@torch.inference_mode()
def _embeddings(model: torch.nn.Module, preprocess, tokenizer, images: list[bytes], texts: list[str]):
    """(image_emb, text_emb, pixels, tokens): normalised embeddings and the inputs they came from."""
    pixels = torch.stack([preprocess(decode_image(data)) for data in images])
    tokens = tokenizer(texts)
    model = model.eval()
    return model.encode_image(pixels, normalize=True).numpy(), model.encode_text(tokens, normalize=True).numpy(), pixels, tokens


def run_checks(cfg: ExportConfig, student: models.LoadedModel, out_dir: Path) -> dict:
    """Max abs embedding differences: reloaded student vs trained, onnxruntime vs PyTorch."""
    images, texts = _check_data(cfg)
    want_image, want_text, pixels, tokens = _embeddings(student.model, student.preprocess, student.tokenizer, images, texts)
    # the export as a user loads it: plain open_clip, its own preprocessing and tokenizer from the folder
    reloaded, _, reloaded_preprocess = open_clip.create_model_and_transforms(f"local-dir:{out_dir}")
    got_image, got_text, _, _ = _embeddings(reloaded, reloaded_preprocess, open_clip.get_tokenizer(f"local-dir:{out_dir}"),
                                            images, texts)
    report = {
        "check_images": len(texts),
        "reload_image_max_abs_diff": float(np.abs(got_image - want_image).max()),
        "reload_text_max_abs_diff": float(np.abs(got_text - want_text).max()),
    }
    if cfg.onnx:
        import onnxruntime as ort

        for tower, name, inputs, want in (("image", names.IMAGE_ONNX, pixels, want_image), ("text", names.TEXT_ONNX, tokens, want_text)):
            session = ort.InferenceSession(str(out_dir / name), providers=["CPUExecutionProvider"])
            got = session.run(None, {tower: inputs.numpy()})[0]
            report[f"onnx_{tower}_max_abs_diff"] = float(np.abs(got - want).max())
    report["onnx_tolerance"] = cfg.onnx_tolerance
    failed = [k for k, v in report.items() if k.endswith("max_abs_diff") and not v <= (cfg.onnx_tolerance if "onnx" in k else 1e-6)]
    if failed:
        raise ExportError(f"{out_dir}: export checks failed: " + ", ".join(f"{k}={report[k]:.2e}" for k in failed))
    return report


def export(cfg: ExportConfig) -> dict:
    """Export `cfg.student_dir` into `cfg.out_dir`; returns the report (also in export_report.json). The folder is
    written beside it and put in place whole once checked: `local-dir:` never finds a half-written export."""
    staging = atomic.staging_dir(cfg.out_dir)
    shutil.rmtree(staging, ignore_errors=True)  # a killed export's (the stage's lock says no export is running)
    out_dir = atomic.prepare_output_dir(staging)
    metrics = _read_json(Path(cfg.metrics_file), "the metrics of `dsmd evaluate`")
    if cfg.student not in metrics.get("students", {}):
        raise ExportError(f"{cfg.metrics_file}: no student {cfg.student!r} (has {sorted(metrics.get('students', {}))})")
    split_manifest = store.load_split_manifest(cfg.features_dir, cfg.split)
    student = load_student(cfg.student_dir)
    model_name = _read_json(Path(cfg.student_dir) / names.OPEN_CLIP_CONFIG, "the student's config")["model_name"]

    write_open_clip_dir(student, model_name, out_dir)
    if cfg.onnx:
        export_onnx(student, out_dir, cfg.opset)
    report = {"student": cfg.student, "model_name": model_name, "image_size": student.image_size,
              **run_checks(cfg, student, out_dir)}
    summary = _read_json(Path(cfg.student_dir) / names.TRAIN_SUMMARY_FILE, "the student's train summary")
    card = model_card(cfg, model_name, metrics, split_manifest, summary, report)
    atomic.atomic_write_text(card, out_dir / names.MODEL_CARD)
    atomic.atomic_write_json(report, out_dir / names.EXPORT_REPORT)
    atomic.publish_dir(staging, cfg.out_dir)
    log.info("exported %s to %s", cfg.student_dir, cfg.out_dir)
    return report


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ExportError(f"{path} not found ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not valid JSON ({exc})") from None


def _metrics_table(metrics: dict) -> list[str]:
    models_ = {"teacher": metrics["teacher"], **metrics["students"]}
    tasks = list(metrics["teacher"].get("zeroshot", {}))
    header = ["model", "I2T R@1", "T2I R@1", "RSUM", "quality ratio", "image time ratio"] + [f"zero-shot {t} acc1" for t in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in models_.items():
        row = [name, f"{m['i2t_r1']:.1f}", f"{m['t2i_r1']:.1f}", f"{m['rsum']:.1f}",
               f"{m.get('quality_ratio', 1.0):.3f}", f"{m.get('image_time_ratio', 1.0):.3f}"]
        row += [f"{100 * m['zeroshot'][t]['acc1']:.1f}" for t in tasks]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def model_card(cfg: ExportConfig, model_name: str, metrics: dict, split_manifest: dict, summary: dict, report: dict) -> str:
    """The card: what the student is, where it came from, how good and how fast, how to load it."""
    teacher = split_manifest.get("teacher", {})
    student = metrics["students"][cfg.student]
    train = summary.get("config", {})
    lines = [
        "---", "library_name: open_clip", "tags: [clip, knowledge-distillation, dsmd, image-text-retrieval]", "---", "",
        f"# {model_name}, distilled with DSMD ({cfg.student})", "",
        f"A CLIP-style student of open_clip config `{model_name}` trained by dsmd-pipeline with "
        f"`{train.get('loss', '?')}` loss from cached embeddings of its teacher, which it never loaded.", "",
        "## Provenance", "",
        f"- teacher: `{teacher.get('model')}`, weights {teacher.get('checkpoint_sha256') and 'sha256 ' + teacher['checkpoint_sha256'] or teacher.get('pretrained_tag')}",
        f"- corpus manifest sha256: `{split_manifest.get('manifest_sha256')}`; evaluated on split `{metrics['split']}` "
        f"({metrics['num_images']} images, {metrics['num_texts']} texts)",
        f"- training: {summary.get('steps')} steps on {summary.get('num_images')} images, "
        f"batch {train.get('optim', {}).get('batch_size')}, lr {train.get('optim', {}).get('lr')}, seed {train.get('optim', {}).get('seed')}",
        "", "## Results", "",
        *_metrics_table(metrics), "",
        f"Quality ratio = student RSUM / teacher RSUM; image time ratio = the student's image-encoder time per image "
        f"over the teacher's (timed side by side on {metrics['device_name']}, {metrics['threads']} threads). "
        f"This student: {student['cost']['params_total']:,} parameters ({student['cost']['params_image']:,} in the image "
        f"tower), {student['cost']['image_ms_per_image']:.3f} ms per image against the teacher's "
        f"{metrics['teacher']['cost']['image_ms_per_image']:.3f}.", "",
        "## Use", "",
        "```python", "import open_clip",
        f"model, _, preprocess = open_clip.create_model_and_transforms('local-dir:{cfg.out_dir}')",
        f"tokenizer = open_clip.get_tokenizer('local-dir:{cfg.out_dir}')", "```", "",
    ]
    if cfg.onnx:
        lines += [
            f"ONNX (`{names.IMAGE_ONNX}`: input `image` (batch, 3, {report['image_size']}, {report['image_size']}) float32 as `preprocess` makes it; "
            f"`{names.TEXT_ONNX}`: input `text` (batch, context) int64 as the tokenizer makes it; both output the L2-normalised `embedding`):", "",
            "```python", "import onnxruntime as ort",
            f"session = ort.InferenceSession('{cfg.out_dir}/{names.IMAGE_ONNX}')",
            "embedding = session.run(None, {'image': preprocess(pil_image)[None].numpy()})[0]", "```", "",
        ]
    lines += [
        "Publish (needs a Hugging Face token; not run by the pipeline):", "",
        "```python", "import open_clip",
        "from open_clip.push_to_hf_hub import push_to_hf_hub",
        f"model, _, _ = open_clip.create_model_and_transforms('local-dir:{cfg.out_dir}')",
        f"push_to_hf_hub(model, open_clip.get_tokenizer('local-dir:{cfg.out_dir}'), "
        f"open_clip.get_model_config('{model_name}'), repo_id='<org>/<name>')", "```",
        "(`push_to_hf_hub` writes its own card only when the repository has none: upload this README.md with it.)", "",
        "## Export checks", "",
        *[f"- {k}: {v:.2e}" if isinstance(v, float) else f"- {k}: {v}" for k, v in report.items()],
        "", "Params of the training run:", "", "```json", json.dumps(train, indent=2, sort_keys=True), "```", "",
    ]
    return "\n".join(lines)
