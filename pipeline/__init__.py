"""dsmd-pipeline: Dynamic Self-adaptive Multiscale Distillation from cached teacher embeddings."""

__version__ = "0.1.0"
