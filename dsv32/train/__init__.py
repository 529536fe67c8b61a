"""Training: data, losses, the trainer and DeepSeek's two-stage DSA continued training."""

from dsv32.train.trainer import TrainConfig, Trainer, run

__all__ = ["TrainConfig", "Trainer", "run"]
