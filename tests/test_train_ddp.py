"""`dsmd train` under torchrun: 2 CPU ranks (gloo) x B/2 match 1 process x B on the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.common import names
from pipeline.common.params import stage_config
from pipeline.training import loop
from tests.conftest import REPO_ROOT
from tests.fakes import write_fake_features
from tests.test_data import write_negatives


def _params(tmp_path: Path, accum_steps: int, data_loading: str) -> Path:
    features, negatives = tmp_path / "features", tmp_path / "negatives"
    if not features.exists():
        write_fake_features(features, "train", n_images=48, captions_per_image=2, dim=32, views=2, seed=3)
        write_negatives(features, negatives, k=3)
    train = {
        "model": "dsmd-test-student",
        "features_dir": str(features),
        "negatives_dir": str(negatives),
        "batching": "hard-negative-aware",
        "data_loading": data_loading,
        "optim": {"max_steps": 4, "batch_size": 16, "accum_steps": accum_steps, "lr": 3e-3, "warmup_steps": 2,
                  "threads": 1, "log_every": 1, "checkpoint_every": 2},
        "distill": {"queue_size": 40, "hard_negatives": 2},
    }
    path = tmp_path / f"params-{accum_steps}.yaml"
    path.write_text(yaml.safe_dump({"train": train}))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("accum_steps, data_loading", [(1, "memory"), (2, "stream")])
def test_two_ranks_match_one_process(tmp_path, accum_steps, data_loading):
    params = _params(tmp_path, accum_steps, data_loading)
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    # the reference: one process, the whole global batch, no accumulation
    loop.train(stage_config(params, "train", {"out_dir": str(single_dir), "optim.accum_steps": 1}))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "stages.train", "--params", str(params), "--out-dir", str(ddp_dir),
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("student saved to") == 1  # rank 0 alone reports and writes

    single = torch.load(single_dir / names.CHECKPOINT_FILE, weights_only=True)
    ddp = torch.load(ddp_dir / names.CHECKPOINT_FILE, weights_only=True)
    assert ddp["world_size"] == 2 and ddp["step"] == 4
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=0, atol=2e-5, msg=key)
    torch.testing.assert_close(ddp["projection"]["weight"], single["projection"]["weight"], rtol=0, atol=2e-5)
    # every rank enqueued the same global batches, in the same order
    torch.testing.assert_close(ddp["queue"]["owner_ids"], single["queue"]["owner_ids"])
    saved = torch.load(ddp_dir / names.WEIGHTS_FILE, weights_only=True)
    torch.testing.assert_close(saved["logit_scale"], single["model"]["logit_scale"], rtol=0, atol=2e-5)
    single_log = (single_dir / names.TRAIN_LOG_FILE).read_text().splitlines()
    ddp_log = (ddp_dir / names.TRAIN_LOG_FILE).read_text().splitlines()
    assert len(single_log) == len(ddp_log) == 4
