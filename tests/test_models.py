"""The one open_clip factory: quiet where random weights are the intended start, loud otherwise."""
from __future__ import annotations

import logging

from pipeline import models


def test_random_init_is_the_intended_start_and_says_nothing(caplog):
    with caplog.at_level(logging.WARNING):
        models.load_model("dsmd-test-student", "")
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
    # the filter is gone afterwards: open_clip's other warnings (and this one elsewhere) are not swallowed
    assert not any(isinstance(f, models._DropRandomInitWarning) for f in logging.getLogger().filters)


def test_the_identity_pins_the_weights_actually_loaded(tmp_path):
    import torch

    first, second = models.load_model("dsmd-test-teacher", ""), models.load_model("dsmd-test-teacher", "")
    # two random-weight teachers are two teachers, though named alike
    assert first.identity["pretrained"] == second.identity["pretrained"] is None
    assert first.identity["weights_sha256"] != second.identity["weights_sha256"]
    assert models.comparable_identity(first.identity) != models.comparable_identity(second.identity)
    # the same weights, by another path, are the same teacher
    path = tmp_path / "teacher.pt"
    torch.save(first.model.state_dict(), path)
    (tmp_path / "sub").mkdir()
    again = models.load_model("dsmd-test-teacher", str(tmp_path / "sub" / ".." / "teacher.pt"))
    assert again.identity["weights_sha256"] == first.identity["weights_sha256"]
    reloaded = models.load_model("dsmd-test-teacher", str(path))
    assert models.comparable_identity(reloaded.identity) == models.comparable_identity(again.identity)
    # one changed weight is another teacher
    with torch.no_grad():
        next(reloaded.model.parameters()).view(-1)[0] += 1e-3
    assert models.weights_sha256(reloaded.model) != first.identity["weights_sha256"]


def test_an_extraction_resumed_with_other_weights_is_refused_naming_them(tmp_path):
    from pipeline.common.config import ExtractConfig
    from pipeline.features import extract

    cfg = ExtractConfig()
    info = [extract._run_info(models.load_model("dsmd-test-teacher", ""), "m", cfg, views=0) for _ in range(2)]
    with __import__("pytest").raises(extract.ExtractMismatchError, match="teacher.weights_sha256"):
        extract._check_compatible(tmp_path / "_run.json", info[0], info[1])
    legacy = {**info[0], "teacher": {k: v for k, v in info[0]["teacher"].items() if k != "weights_sha256"}}
    extract._check_compatible(tmp_path / "_run.json", info[0], info[0])  # the same teacher resumes
    with __import__("pytest").raises(extract.ExtractMismatchError, match="weights_sha256: None"):
        extract._check_compatible(tmp_path / "_run.json", legacy, info[0])  # written before the fingerprint


def test_a_plain_model_name_never_reads_a_card_from_the_working_directory(tmp_path, monkeypatch):
    import json
    from pipeline.common.config import TeacherConfig
    # a card.json that belongs to something else, where a plain name's Path(name).parent would look
    (tmp_path / "card.json").write_text(json.dumps({"world": {"name": "synthetic", "version": 1}}))
    monkeypatch.chdir(tmp_path)
    loaded = models.load_teacher(TeacherConfig(model="dsmd-test-teacher", pretrained=""))
    assert "world" not in loaded.identity
