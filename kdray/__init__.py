"""kdray: knowledge distillation for semantic segmentation, swept with Ray Tune + Optuna, tracked in MLflow."""

__version__ = "0.1.0"
