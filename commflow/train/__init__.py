"""The reference trainer, commflow's main job: a hybrid Linear-Llama on sequence parallelism.

The main API is :func:`train` (one rank's job, under torchrun or spawned by
:func:`launch`) with a :class:`TrainConfig`; ``commflow train`` is the command.
:class:`LinearLlama` is the model and :class:`MQAR` / :class:`TokenFile` the data.
"""

from .config import PRESETS, ModelConfig, TrainConfig, validate
from .data import MQAR, TokenFile
from .model import LinearLlama

__all__ = ["MQAR", "PRESETS", "LinearLlama", "ModelConfig", "TokenFile", "TrainConfig", "launch", "train", "validate"]


def train(cfg: TrainConfig) -> dict:
    """Train on this rank (see :func:`commflow.train.loop.train`)."""
    from .loop import train as _train

    return _train(cfg)


def launch(cfg: TrainConfig) -> dict:
    """Spawn local workers, or train in place under torchrun (see :func:`commflow.train.cli.launch`)."""
    from .cli import launch as _launch

    return _launch(cfg)
