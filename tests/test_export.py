"""`dsmd export`: the safetensors student reloads with plain open_clip and gives the trained student's
embeddings; the ONNX towers give PyTorch's at any batch size; the card carries the run's figures."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from pipeline import export as export_mod
from pipeline.common.params import ExportConfig
from pipeline.corpus.augment import decode_image
from pipeline.models import load_student
from pipeline.training import loop
from tests.fakes import write_fake_features
from tests.test_training import make_cfg


def train_student_with_metrics(root: Path) -> Path:
    """A student trained a few steps from fake features in `root`, and a metrics file naming it `tiny`."""
    write_fake_features(root / "features", "train", n_images=64, captions_per_image=2, dim=32, seed=0)
    cfg = make_cfg((root / "features", root / "negatives"), root / "student", max_steps=3)
    cfg.loss = "clip"
    loop.train(cfg)
    cost = {"params_total": 10, "params_image": 4, "image_ms_per_image": 0.5}
    quality = {"i2t_r1": 40.0, "t2i_r1": 38.5, "rsum": 321.5}
    metrics = {"split": "train", "num_images": 64, "num_texts": 128, "device_name": "cpu", "threads": 1,
               "teacher": {**quality, "rsum": 400.0, "cost": {**cost, "image_ms_per_image": 2.0}},
               "students": {"tiny": {**quality, "quality_ratio": 0.80375, "image_time_ratio": 0.25, "cost": cost}}}
    (root / "metrics.json").write_text(json.dumps(metrics))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_student_with_metrics(tmp_path_factory.mktemp("export"))


def _export(root: Path, **kw) -> tuple[ExportConfig, dict]:
    cfg = ExportConfig(student="tiny", student_dir=str(root / "student"), features_dir=str(root / "features"),
                       split="train", metrics_file=str(root / "metrics.json"), out_dir=str(root / "out"), check_images=8, **kw)
    return cfg, export_mod.export(cfg)


def test_the_export_reloads_with_plain_open_clip_and_matches_the_student(trained):
    cfg, report = _export(trained)
    out = Path(cfg.out_dir)
    assert {p.name for p in out.iterdir()} == {"open_clip_model.safetensors", "open_clip_config.json", "image_encoder.onnx",
                                               "text_encoder.onnx", "README.md", "export_report.json"}
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    student = load_student(trained / "student")
    from pipeline.features import store
    image = decode_image(store.image_bytes(trained / "features", "train")[0])
    with torch.no_grad():
        for m, pre in ((model.eval(), preprocess), (student.model.eval(), student.preprocess)):
            m.image_emb = m.encode_image(pre(image)[None])
            m.text_emb = m.encode_text(tokenizer(["a red square"]))
    torch.testing.assert_close(model.image_emb, student.model.image_emb, rtol=0, atol=0)
    torch.testing.assert_close(model.text_emb, student.model.text_emb, rtol=0, atol=0)
    assert report["reload_image_max_abs_diff"] == 0.0


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_towers_match_pytorch_at_any_batch(trained, batch):
    import onnxruntime as ort

    cfg, _ = _export(trained)
    student = load_student(trained / "student")
    pixels = torch.randn(batch, 3, student.image_size, student.image_size)
    tokens = student.tokenizer([f"caption number {i}" for i in range(batch)])
    with torch.no_grad():
        want_image = student.model.encode_image(pixels, normalize=True).numpy()
        want_text = student.model.encode_text(tokens, normalize=True).numpy()
    for name, feed, want in (("image_encoder.onnx", {"image": pixels.numpy()}, want_image),
                             ("text_encoder.onnx", {"text": tokens.numpy()}, want_text)):
        got = ort.InferenceSession(str(Path(cfg.out_dir) / name), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4, name


def test_the_card_carries_the_runs_figures_and_how_to_load(trained):
    cfg, report = _export(trained)
    card = (Path(cfg.out_dir) / "README.md").read_text()
    assert "| tiny | 40.0 | 38.5 | 321.5 | 0.804 | 0.250 |" in card
    assert "| teacher | 40.0 | 38.5 | 400.0 | 1.000 | 1.000 |" in card
    assert f"create_model_and_transforms('local-dir:{cfg.out_dir}')" in card and "push_to_hf_hub" in card
    assert '"max_steps": 3' in card  # the training params


def test_a_student_missing_from_the_metrics_is_one_clear_error(trained):
    with pytest.raises(export_mod.ExportError, match="no student 'other'"):
        export_mod.export(ExportConfig(student="other", student_dir=str(trained / "student"),
                                       metrics_file=str(trained / "metrics.json"), out_dir=str(trained / "o2")))


def test_an_export_that_does_not_reproduce_the_student_fails(trained, monkeypatch):
    real = export_mod._Tower.forward
    monkeypatch.setattr(export_mod._Tower, "forward", lambda self, x: real(self, x) * 1.01)  # a broken graph
    with pytest.raises(export_mod.ExportError, match="onnx_image_max_abs_diff"):
        _export(trained)
