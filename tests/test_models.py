"""The one open_clip factory: quiet where random weights are the intended start, loud otherwise."""
from __future__ import annotations

import logging

from pipeline import models


def test_random_init_is_the_intended_start_and_says_nothing(caplog):
    with caplog.at_level(logging.WARNING):
        models.load_model("dsmd-test-student", "")
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
    # the filter is gone afterwards: open_clip's own warning still reaches a root-logger handler
    with caplog.at_level(logging.WARNING):
        logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
    assert any("No pretrained weights" in r.getMessage() for r in caplog.records)
