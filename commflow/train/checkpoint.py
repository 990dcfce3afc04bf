"""Checkpoints: torch.distributed.checkpoint (DCP), written atomically, kept rotating.

Layout under the run folder::

    checkpoints/
      step_00000200/          a complete checkpoint (DCP files + .metadata + train_state.json)
      step_00000300/
      .tmp_step_00000400/     being written; never read

A checkpoint is written into ``.tmp_step_N`` by every rank (``dcp.save``: each rank
writes its shards, rank 0 the metadata), then rank 0 renames the folder to
``step_N`` after a barrier: a rename is atomic, so a reader (``--resume``, the health
supervisor restarting a job) sees either the whole checkpoint or none of it, even if
the job dies mid-write. Older checkpoints beyond ``keep`` are removed after the rename.

What is saved: the model and optimizer state (through ``get_state_dict``, which gives
plain fully-qualified names under DDP and sharded DTensors under FSDP2) and, in
``train_state.json``, the step, the model architecture and the data settings. The data
order and the learning rate are pure functions of the step and the seed (see
commflow.train.data), so no RNG state is needed. DCP stores tensors by global shape
and offset, so a checkpoint loads into a different world size or dp/sp mesh, and
between DDP and FSDP2 (resharding on load).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

__all__ = ["latest_checkpoint", "list_checkpoints", "load_checkpoint", "read_train_state", "save_checkpoint"]

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
TRAIN_STATE = "train_state.json"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``folder`` as (step, path), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / ".metadata").is_file() and (p / TRAIN_STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint in ``folder``, or None."""
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def read_train_state(path: str | Path) -> dict[str, Any]:
    """The JSON side of a checkpoint (step, model, data); a plain file read, no collective."""
    return json.loads((Path(path) / TRAIN_STATE).read_text())


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(folder: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict[str, Any], *, keep: int) -> Path:
    """Write checkpoint ``step`` into ``folder`` atomically; keep the newest ``keep``. Collective."""
    folder = Path(folder)
    tmp, final = folder / f".tmp_step_{step:08d}", folder / f"step_{step:08d}"
    if _rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a job that died mid-write
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    if _rank() == 0:
        (tmp / TRAIN_STATE).write_text(json.dumps({**train_state, "step": step}, indent=1))
    _barrier()  # every rank's shards are on disk before the rename publishes them
    if _rank() == 0:
        if final.exists():  # the same step written again (a resumed run repeating it)
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in list_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load model and optimizer state from ``path`` (resharding as needed); return its train state. Collective."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return read_train_state(path)
