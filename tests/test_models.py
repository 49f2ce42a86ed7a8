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
