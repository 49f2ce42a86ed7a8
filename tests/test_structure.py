"""The shape of the house: stage one never reaches the training code."""
import subprocess
import sys

TRAINING_MODULES = {"pipeline.training", "pipeline.losses", "pipeline.balancer", "pipeline.data", "pipeline.pretrain"}


def _pipeline_modules_imported_by(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('pipeline')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_extract_and_mine_do_not_import_the_training_loop():
    for module in ("pipeline.extract", "pipeline.mining", "pipeline.teacher", "stages.extract", "stages.mine", "stages.teacher"):
        imported = _pipeline_modules_imported_by(module)
        assert "pipeline.models" in imported or module.endswith(("mine", "mining"))
        assert not imported & TRAINING_MODULES, (module, sorted(imported & TRAINING_MODULES))
