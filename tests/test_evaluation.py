import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from pipeline import models
from pipeline.common import atomic, names
from pipeline.common.config import ConfigError
from pipeline.common.params import EvaluateConfig
from pipeline.corpus.augment import decode_image
from pipeline.evaluation import evaluate, retrieval
from pipeline.features import schema, store
from pipeline.models import load_model, save_open_clip_dir
from tests.fakes import unit, write_fake_features


# ---- brute-force reference, independent of the chunked code --------------------------------

def brute_force_ranks(image_emb, text_emb, text_to_image):
    """Full similarity matrix, then a sort where, among equal scores, correct items come first
    (ties in the query's favour), and the 1-based position of the first correct item."""
    scores = image_emb.astype(np.float64) @ text_emb.astype(np.float64).T
    n, m = scores.shape
    i2t = np.zeros(n, dtype=np.int64)
    for i in range(n):
        correct = text_to_image == i
        order = np.lexsort((~correct, -scores[i]))  # primary: score desc; then correct first
        i2t[i] = np.flatnonzero(correct[order])[0] + 1
    t2i = np.zeros(m, dtype=np.int64)
    for t in range(m):
        correct = np.arange(n) == text_to_image[t]
        order = np.lexsort((~correct, -scores[:, t]))
        t2i[t] = np.flatnonzero(correct[order])[0] + 1
    return i2t, t2i


def brute_force_metrics(image_emb, text_emb, text_to_image, ks=(1, 5, 10)):
    i2t, t2i = brute_force_ranks(image_emb, text_emb, text_to_image)
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * np.mean(ranks <= k)
        out[f"{name}_mean_rank"] = np.mean(ranks)
        out[f"{name}_median_rank"] = np.median(ranks)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    for k in ks:  # CLIP_benchmark: fractions; "image retrieval" has text queries
        out[f"image_retrieval_recall@{k}"] = np.mean(t2i <= k)
        out[f"text_retrieval_recall@{k}"] = np.mean(i2t <= k)
    return out


def quantised(rng, n, dim, levels=2):
    # small integer vectors: dot products are exact in float32 and many of them tie
    return rng.integers(-levels, levels + 1, size=(n, dim)).astype(np.float32)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("captions", [1, 5])
def test_chunked_metrics_match_brute_force_on_random_data(chunk_size, captions):
    rng = np.random.default_rng(chunk_size * 10 + captions)
    n_images, dim = 60, 8
    text_to_image = np.repeat(np.arange(n_images), captions)
    rng.shuffle(text_to_image)  # captions need not be grouped by image
    image_emb = unit(rng, n_images, dim)
    text_emb = image_emb[text_to_image] + 1.5 * unit(rng, len(text_to_image), dim)  # noisy: ranks spread out
    got_i2t, got_t2i = evaluate.retrieval_ranks(image_emb, text_emb, text_to_image, chunk_size)
    want_i2t, want_t2i = brute_force_ranks(image_emb, text_emb, text_to_image)
    np.testing.assert_array_equal(got_i2t, want_i2t)
    np.testing.assert_array_equal(got_t2i, want_t2i)
    assert want_i2t.max() > 5 and want_t2i.max() > 5  # the case actually exercises ranking
    got = evaluate.retrieval_metrics(image_emb, text_emb, text_to_image, (1, 5, 10), chunk_size)
    want = brute_force_metrics(image_emb, text_emb, text_to_image)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key]), key


@pytest.mark.parametrize("chunk_size", [3, 50])
def test_ties_are_counted_in_the_querys_favour_like_the_reference(chunk_size):
    rng = np.random.default_rng(1)
    image_emb = quantised(rng, 40, 3, levels=1)
    text_to_image = np.repeat(np.arange(40), 5)
    text_emb = quantised(rng, 200, 3, levels=1)
    scores = image_emb @ text_emb.T
    assert len(np.unique(scores)) < 20  # heavy ties
    got = evaluate.retrieval_ranks(image_emb, text_emb, text_to_image, chunk_size)
    want = brute_force_ranks(image_emb, text_emb, text_to_image)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_perfect_embeddings_give_100():
    rng = np.random.default_rng(2)
    image_emb = unit(rng, 30, 32)
    text_to_image = np.repeat(np.arange(30), 5)
    metrics = evaluate.retrieval_metrics(image_emb, image_emb[text_to_image], text_to_image, chunk_size=4)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert metrics[key] == 100.0
    assert metrics["rsum"] == 600.0
    assert metrics["i2t_mean_rank"] == metrics["t2i_median_rank"] == 1.0


def test_hand_computed_case():
    # 2-d unit vectors; image 0 = (1, 0), image 1 = (0, 1)
    image_emb = np.array([[1, 0], [0, 1]], dtype=np.float32)
    # text 0 (of image 0) points at image 1; text 1 (of image 0) is exact; text 2 (of image 1) in between leaning to 0
    text_emb = np.array([[0, 1], [1, 0], [0.8, 0.6]], dtype=np.float32)
    text_to_image = np.array([0, 0, 1])
    # i2t image 0: scores t0=0, t1=1, t2=0.8 -> best own caption t1 is first -> rank 1
    # i2t image 1: scores t0=1, t1=0, t2=0.6 -> own caption t2 is behind t0 -> rank 2
    # t2i text 0: image 0 scores 0, image 1 scores 1 -> rank 2; text 1: rank 1; text 2: 0.8 vs 0.6 -> rank 2
    m = evaluate.retrieval_metrics(image_emb, text_emb, text_to_image, ks=(1, 2), chunk_size=1)
    assert m["i2t_r1"] == 50.0 and m["i2t_r2"] == 100.0
    assert m["t2i_r1"] == pytest.approx(100 / 3) and m["t2i_r2"] == 100.0
    assert m["i2t_mean_rank"] == 1.5 and m["i2t_median_rank"] == 1.5
    assert m["t2i_mean_rank"] == pytest.approx(5 / 3) and m["t2i_median_rank"] == 2.0
    assert m["rsum"] == pytest.approx(50 + 100 + 100 / 3 + 100)


def test_chunking_never_builds_the_full_matrix(monkeypatch):
    shapes = []
    original = retrieval._chunk_scores

    def recording(queries, database):
        out = original(queries, database)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(retrieval, "_chunk_scores", recording)
    rng = np.random.default_rng(3)
    n, m, chunk = 50, 250, 16
    text_to_image = np.repeat(np.arange(n), 5)
    evaluate.retrieval_ranks(unit(rng, n, 8), unit(rng, m, 8), text_to_image, chunk_size=chunk)
    assert shapes, "scores must go through _chunk_scores"
    assert all(rows <= chunk for rows, _ in shapes)
    assert sum(rows for rows, cols in shapes if cols == m) == n  # every image queried once
    assert sum(rows for rows, cols in shapes if cols == n) == m  # every text queried once


def test_image_without_captions_is_left_out_of_i2t():
    rng = np.random.default_rng(4)
    image_emb = unit(rng, 5, 4)
    text_to_image = np.array([0, 1, 2, 3])  # image 4 has no caption
    i2t, _ = evaluate.retrieval_ranks(image_emb, image_emb[text_to_image], text_to_image, chunk_size=2)
    assert i2t[4] == 0 and (i2t[:4] == 1).all()
    m = evaluate.metrics_from_ranks(i2t, np.ones(4, dtype=np.int64))
    assert m["i2t_r1"] == 100.0 and m["images_without_captions"] == 1


def test_bad_inputs_raise_clear_errors():
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="text_to_image"):
        evaluate.retrieval_ranks(unit(rng, 3, 4), unit(rng, 3, 4), np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="NaN"):
        bad = unit(rng, 3, 4)
        bad[0, 0] = np.nan
        evaluate.retrieval_ranks(bad, unit(rng, 3, 4), np.array([0, 1, 2]))
    with pytest.raises(ConfigError, match="ks"):
        evaluate.metrics_from_ranks(np.ones(3), np.ones(3), ks=[0])


# ---- encoding, cost, the whole stage ----------------------------------------------------------

def save_student(folder, seed, log_lines=None):
    torch.manual_seed(seed)
    loaded = load_model("dsmd-test-student", "")
    save_open_clip_dir(loaded.model, "dsmd-test-student", folder)
    if log_lines is not None:
        (folder / names.TRAIN_LOG_FILE).write_text("\n".join(log_lines) + "\n")
    return loaded


def test_encode_split_equals_calling_the_model_directly(tmp_path):
    write_fake_features(tmp_path / "features", "test", n_images=10, captions_per_image=3, dim=32)
    save_student(tmp_path / "student", seed=0)
    loaded = models.load_student(tmp_path / "student")
    image_emb, text_emb, text_to_image = evaluate.encode_split(loaded, tmp_path / "features", "test", batch_size=4)

    texts = store.read_texts(tmp_path / "features", "test")
    with torch.no_grad():
        pixels = torch.stack([loaded.preprocess(decode_image(b)) for b in store.image_bytes(tmp_path / "features", "test")])
        want_images = F.normalize(loaded.model.encode_image(pixels), dim=-1).numpy()
        tokens = loaded.tokenizer(texts[schema.CAPTION].to_pylist())
        want_texts = F.normalize(loaded.model.encode_text(tokens), dim=-1).numpy()
    assert image_emb.dtype == np.float32 and image_emb.shape == (10, 16) and text_emb.shape == (30, 16)
    np.testing.assert_allclose(image_emb, want_images, atol=1e-5)
    np.testing.assert_allclose(text_emb, want_texts, atol=1e-5)
    np.testing.assert_array_equal(text_to_image, np.repeat(np.arange(10), 3))
    # the saved weights were loaded, not a fresh random init
    fresh = load_model("dsmd-test-student", "")
    assert not torch.equal(fresh.model.visual.conv1.weight, loaded.model.visual.conv1.weight)


def test_encoder_cost_is_positive_and_counts_parameters():
    loaded = load_model("dsmd-test-student", "")
    cost = evaluate.encoder_cost(loaded, "cpu", latency_repeats=3, throughput_batch=8, throughput_repeats=2)
    model = loaded.model
    assert cost["params_total"] == sum(p.numel() for p in model.parameters())
    assert cost["params_image"] == sum(p.numel() for p in model.visual.parameters())
    assert cost["params_text"] == cost["params_total"] - cost["params_image"] - model.logit_scale.numel()
    for key in ("image_latency_ms", "text_latency_ms", "image_throughput", "text_throughput"):
        assert cost[key] > 0, key
    assert cost["image_ms_per_image"] == pytest.approx(1000 / cost["image_throughput"])


def test_compare_encoder_costs_ranks_a_bigger_model_as_slower():
    small = load_model("dsmd-test-student", "")
    big = load_model("dsmd-tiny-student", "")  # 2 layers x 64 wide vs 1 x 16: far more work per image
    costs = evaluate.compare_encoder_costs({"small": small, "big": big}, "cpu", 3, 16, 3)
    assert costs["big"]["params_total"] > costs["small"]["params_total"]
    assert costs["big"]["image_ms_per_image"] > costs["small"]["image_ms_per_image"]


def write_teacher_manifest_identity(features_dir, split, model):
    path = store.split_dir(features_dir, split) / schema.SPLIT_MANIFEST
    manifest = json.loads(path.read_text())
    manifest["teacher"]["model"] = model
    atomic.atomic_write_json(manifest, path)


def small_config(tmp_path, students, **overrides):
    values = dict(
        features_dir=str(tmp_path / "features"), split="test", teacher_dir=str(tmp_path / "teacher"),
        students={k: str(v) for k, v in students.items()}, chunk_size=7, batch_size=8,
        latency_repeats=2, throughput_batch=8, throughput_repeats=1, device="cpu", threads=1,
        metrics_file=str(tmp_path / "out" / "metrics.json"), plots_dir=str(tmp_path / "out" / "plots"),
        report_dir=str(tmp_path / "out" / "report"),
    )
    values.update(overrides)
    return EvaluateConfig(**values)


LOG_LINES = [
    json.dumps({"step": s, "epoch": 0, "lr": 1e-3, "samples_per_s": 100.0, "loss_total": 4.0 / s,
                "loss_feature": 1.0 / s, "loss_contrastive": 3.0 / s, "weight_feature": 2.0, "weight_contrastive": 1.0})
    for s in range(1, 6)
] + ["not json"]


def test_evaluate_writes_consistent_metrics_and_valid_plots(tmp_path):
    write_fake_features(tmp_path / "features", "test", n_images=24, captions_per_image=5, dim=32)
    write_teacher_manifest_identity(tmp_path / "features", "test", "dsmd-test-teacher")
    save_student(tmp_path / "students" / "dsmd", seed=1, log_lines=LOG_LINES)
    save_student(tmp_path / "students" / "baseline", seed=2)
    cfg = small_config(tmp_path, {"dsmd": tmp_path / "students" / "dsmd", "baseline": tmp_path / "students" / "baseline"})
    metrics = evaluate.evaluate(cfg)

    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["num_images"] == 24 and on_disk["num_texts"] == 120 and on_disk["threads"] == 1
    # teacher quality comes from the cached embeddings, exactly
    image_emb, text_emb, text_to_image = store.load_embeddings(tmp_path / "features", "test")
    want_teacher = brute_force_metrics(image_emb, text_emb, text_to_image)
    for key, value in want_teacher.items():
        assert on_disk["teacher"][key] == pytest.approx(value), key
    assert on_disk["teacher"]["model"] == "dsmd-test-teacher"
    teacher_cost = on_disk["teacher"]["cost"]
    assert teacher_cost["params_total"] == sum(p.numel() for p in load_model("dsmd-test-teacher").model.parameters())
    assert set(on_disk["students"]) == {"dsmd", "baseline"}
    for name, student in on_disk["students"].items():
        cost = student["cost"]
        assert student["quality_ratio"] == pytest.approx(student["rsum"] / on_disk["teacher"]["rsum"])
        assert student["image_time_ratio"] == pytest.approx(cost["image_ms_per_image"] / teacher_cost["image_ms_per_image"])
        assert student["image_latency_ratio"] == pytest.approx(cost["image_latency_ms"] / teacher_cost["image_latency_ms"])
        assert student["text_time_ratio"] == pytest.approx(cost["text_ms_per_text"] / teacher_cost["text_ms_per_text"])
        assert cost["params_total"] < teacher_cost["params_total"]
    # student quality equals metrics recomputed from its own embeddings
    dsmd = models.load_student(tmp_path / "students" / "dsmd")
    s_img, s_txt, s_t2i = evaluate.encode_split(dsmd, tmp_path / "features", "test")
    want_dsmd = brute_force_metrics(s_img, s_txt, s_t2i)
    assert on_disk["students"]["dsmd"]["rsum"] == pytest.approx(want_dsmd["rsum"])

    plots = tmp_path / "out" / "plots"
    for name in (names.QUALITY_PLOT, names.CURVES_PLOT):
        with Image.open(plots / name) as image:
            image.verify()
            assert image.format == "PNG"
    points = json.loads((plots / names.QUALITY_DATA).read_text())
    assert [p["model"] for p in points] == ["teacher", "dsmd", "baseline"]
    curves = evaluate.read_train_log(tmp_path / "students" / "dsmd" / names.TRAIN_LOG_FILE)
    assert [r["step"] for r in curves] == [1, 2, 3, 4, 5]  # the bad line is skipped
    assert not list(plots.glob("*.csv"))  # the per-step curves for `dvc plots` are DVCLive's (dsmd train)


def test_the_report_shows_each_models_true_retrievals_from_the_source_images(tmp_path):
    import re
    from pipeline.evaluation import report
    write_fake_features(tmp_path / "features", "test", n_images=24, captions_per_image=5, dim=32)
    write_teacher_manifest_identity(tmp_path / "features", "test", "dsmd-test-teacher")
    save_student(tmp_path / "students" / "dsmd", seed=1)
    cfg = small_config(tmp_path, {"dsmd": tmp_path / "students" / "dsmd"}, report_queries=6, report_images=3)
    evaluate.evaluate(cfg)
    folder = tmp_path / "out" / "report"
    page = (folder / names.REPORT_FILE).read_text()
    sources = re.findall(r"src='([^']+)'", page)
    assert sources and all((folder / src).is_file() for src in sources)  # opens from disk: every image is there
    assert {names.QUALITY_PLOT, names.CURVES_PLOT} <= set(sources)
    image_emb, text_emb, text_to_image = store.load_embeddings(tmp_path / "features", "test")
    blocks = re.findall(r"<div class='query caption' data-text-row='(\d+)' data-true-image='(\d+)'>(.*?)</div>\s*(?=<div class='query|<h2)",
                        page, re.S)
    assert len(blocks) == 6
    source = store.image_bytes(tmp_path / "features", "test")
    for row, true, body in blocks:
        row, true = int(row), int(true)
        assert true == text_to_image[row]  # the marked image is the caption's own
        models = re.findall(r"<b>([^<]+)</b>(.*?)</div>", body, re.S)
        assert [m for m, _ in models] == ["teacher", "dsmd"]
        for _, cells in models:
            for cls, image in re.findall(r"<span class='(hit|miss)' data-image='(\d+)'>", cells):
                assert (cls == "hit") == (int(image) == true)
        # the teacher's top 5 are its own best cosines, by brute force
        teacher_top = [int(i) for i in re.findall(r"data-image='(\d+)'", models[0][1])]
        assert teacher_top == list(np.argsort(-(image_emb @ text_emb[row]), kind="stable")[:5])
    # thumbnails are the stored images, decoded (not re-rendered)
    shown = int(re.search(r"thumbs/(\d+)\.png", page).group(1))
    with Image.open(folder / f"thumbs/{shown}.png") as thumb:
        from pipeline.corpus.augment import decode_image
        original = decode_image(source[shown]).convert("RGB")
        original.thumbnail((report.THUMB_SIZE, report.THUMB_SIZE))
        assert np.array_equal(np.asarray(thumb.convert("RGB")), np.asarray(original))
    # half of the captions name the split's rarest words
    captions = store.read_texts(tmp_path / "features", "test", columns=["caption"])["caption"].to_pylist()
    assert report.pick_captions(captions, 6, 0)[:3] == report.pick_captions(captions, 6, 1)[:3]


def test_teacher_architecture_from_teacher_dir_when_identity_is_unknown(tmp_path):
    write_fake_features(tmp_path / "features", "test", n_images=4, captions_per_image=1, dim=32)
    manifest = store.load_split_manifest(tmp_path / "features", "test")  # model: fake-teacher
    with pytest.raises(evaluate.EvaluationError, match="fake-teacher"):
        evaluate.load_teacher_architecture(manifest, tmp_path / "teacher", "cpu")
    save_open_clip_dir(load_model("dsmd-test-teacher").model, "dsmd-test-teacher", tmp_path / "teacher")
    teacher = evaluate.load_teacher_architecture(manifest, tmp_path / "teacher", "cpu")
    assert teacher.identity["model"] == "dsmd-test-teacher" and teacher.embed_dim == 32


def test_missing_student_is_an_error_or_a_logged_skip(tmp_path, caplog):
    write_fake_features(tmp_path / "features", "test", n_images=6, captions_per_image=2, dim=32)
    write_teacher_manifest_identity(tmp_path / "features", "test", "dsmd-test-teacher")
    save_student(tmp_path / "dsmd", seed=0)
    students = {"dsmd": tmp_path / "dsmd", "baseline": tmp_path / "nowhere"}
    with pytest.raises(evaluate.EvaluationError, match="nowhere"):
        evaluate.evaluate(small_config(tmp_path, students))
    assert not (tmp_path / "out" / "metrics.json").exists()
    metrics = evaluate.evaluate(small_config(tmp_path, students, allow_missing=True))
    assert set(metrics["students"]) == {"dsmd"}
    assert "nowhere" in caplog.text


def test_cli_runs_and_reports_bad_options(tmp_path, monkeypatch):
    from stages.evaluate import app

    write_fake_features(tmp_path / "features", "test", n_images=6, captions_per_image=2, dim=32)
    write_teacher_manifest_identity(tmp_path / "features", "test", "dsmd-test-teacher")
    save_student(tmp_path / "dsmd", seed=0)
    params = tmp_path / "params.yaml"
    params.write_text(
        "evaluate:\n  latency_repeats: 1\n  throughput_batch: 4\n  throughput_repeats: 1\n  device: cpu\n"
        f"  teacher_dir: {tmp_path / 'teacher'}\n  report_dir: {tmp_path / 'report'}\n"
    )
    runner = CliRunner()
    base = ["--params", str(params), "--features-dir", str(tmp_path / "features"),
            "--metrics-file", str(tmp_path / "m.json"), "--plots-dir", str(tmp_path / "plots"), "--threads", "1"]
    result = runner.invoke(app, base + ["--student", f"dsmd={tmp_path / 'dsmd'}"])
    assert result.exit_code == 0, result.output
    assert "RSUM" in result.output and "dsmd" in result.output
    assert set(json.loads((tmp_path / "m.json").read_text())["students"]) == {"dsmd"}
    bad = runner.invoke(app, base + ["--student", "no-equals-sign"])
    assert bad.exit_code == 2 and "NAME=DIR" in bad.output
    missing = runner.invoke(app, base + ["--student", f"x={tmp_path / 'absent'}"])
    assert missing.exit_code == 2 and "absent" in missing.output


def test_quality_plot_labels_stay_inside_the_axes_below_the_title_and_apart():
    # the shipped run's shape: the teacher top right, two students close together bottom left
    points = [{"model": "teacher", "rsum": 445.4, "image_ms_per_image": 0.626},
              {"model": "dsmd", "rsum": 394.3, "image_ms_per_image": 0.084},
              {"model": "baseline", "rsum": 371.3, "image_ms_per_image": 0.080},
              {"model": "dsmd-lr4", "rsum": 390.0, "image_ms_per_image": 0.083}]
    fig, ax, labels = evaluate.quality_figure(points)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes_box, title_box = ax.get_window_extent(renderer), ax.title.get_window_extent(renderer)
    boxes = [label.get_window_extent(renderer) for label in labels]
    for box in boxes:
        assert axes_box.x0 <= box.x0 and box.x1 <= axes_box.x1 and axes_box.y0 <= box.y0 and box.y1 <= axes_box.y1
        assert not box.overlaps(title_box)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)
    import matplotlib.pyplot as plt
    plt.close(fig)


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="Debian's chromium is not installed")
def test_the_report_renders_in_headless_chromium(tmp_path):
    import subprocess
    write_fake_features(tmp_path / "features", "test", n_images=12, captions_per_image=3, dim=32)
    write_teacher_manifest_identity(tmp_path / "features", "test", "dsmd-test-teacher")
    save_student(tmp_path / "students" / "dsmd", seed=1)
    evaluate.evaluate(small_config(tmp_path, {"dsmd": tmp_path / "students" / "dsmd"}, report_queries=2, report_images=1))
    shot = tmp_path / "shot.png"
    subprocess.run(["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1400", f"--screenshot={shot}",
                    (tmp_path / "out" / "report" / names.REPORT_FILE).as_uri()], capture_output=True, timeout=120)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"))
    assert pixels.shape == (1400, 1000) and pixels.std() > 10  # a page with content, not a blank or error screen


def test_added_teachers_and_their_ensemble_are_reference_rows(tmp_path):
    from pipeline.features import schema
    write_fake_features(tmp_path / "features", "test", n_images=24, captions_per_image=5, dim=32)
    write_teacher_manifest_identity(tmp_path / "features", "test", "dsmd-test-teacher")
    save_student(tmp_path / "students" / "dsmd", seed=1)
    own_image, own_text, text_to_image = store.load_embeddings(tmp_path / "features", "test")
    rng = np.random.default_rng(3)
    b_image = rng.normal(size=(24, 16)) + own_image[:, :16]  # a second teacher that half agrees with the first
    b_text = rng.normal(size=(120, 16)) + own_text[:, :16]
    b_image, b_text = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (b_image, b_text))
    info = {"teacher": {"model": "other"}, schema.FEATURES_FINGERPRINT: store.features_fingerprint(tmp_path / "features", "test")}
    store.write_added_teacher(store.added_teacher_dir(tmp_path / "teachers", "b", "test"), info, [b_image], [b_text],
                              24, 120, 16, "float32")
    cfg = small_config(tmp_path, {"dsmd": tmp_path / "students" / "dsmd"}, teachers=["b"],
                       teachers_dir=str(tmp_path / "teachers"), report_dir="")
    metrics = evaluate.evaluate(cfg)
    want_b = brute_force_metrics(b_image.astype(np.float32), b_text.astype(np.float32), text_to_image)
    assert metrics["teachers"]["b"]["rsum"] == pytest.approx(want_b["rsum"]) and metrics["teachers"]["b"]["model"] == "other"
    # the ensemble: both teachers' unit rows side by side, each scaled by sqrt(1/2) (brute force)
    joint_image = np.concatenate([own_image, b_image], axis=1) / np.sqrt(2)
    joint_text = np.concatenate([own_text, b_text], axis=1) / np.sqrt(2)
    want = brute_force_metrics(joint_image.astype(np.float32), joint_text.astype(np.float32), text_to_image)
    assert metrics["teachers"]["ensemble"]["rsum"] == pytest.approx(want["rsum"])
    assert metrics["students"]["dsmd"]["quality_ratio"] == pytest.approx(metrics["students"]["dsmd"]["rsum"] / metrics["teacher"]["rsum"])
