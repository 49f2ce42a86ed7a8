import os
from pathlib import Path

import pytest

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"
FLICKR8K_DIR = SHARED_DIR / "data" / "flickr8k-sample"


@pytest.fixture
def flickr8k_dir() -> Path:
    if not FLICKR8K_DIR.exists():
        pytest.skip("../shared/data/flickr8k-sample is not present beside the checkout")
    return FLICKR8K_DIR


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory) -> Path:
    """A fixed random teacher saved to disk, so every run (and every process) loads the same weights."""
    import torch

    from pipeline.models import load_model

    torch.manual_seed(0)
    loaded = load_model("dsmd-test-teacher", "")
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(loaded.model.state_dict(), path)
    return path


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first: pytest-xdist hands tests out in collection order, and a 3-minute test
    started last would run alone at the end while the other worker idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the rest keep their order
