"""``commflow train`` / ``python -m commflow.train`` / ``torchrun -m commflow.train``.

One flag per field of :class:`~commflow.train.config.TrainConfig` (``data.seq_len`` is
``--seq-len``), generated from the dataclasses with their field docstrings as help, so
the command line and the config cannot drift apart.

Under torchrun (``RANK`` and ``WORLD_SIZE`` in the environment) this process is one
rank and trains in place. Otherwise the command validates the configuration for the
world it is about to create, refusing a bad one before any process starts, and spawns
``--nproc`` local workers (gloo on CPU, NCCL on GPUs) through commflow.dist.spawn.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import types
import typing
from typing import Any

import typer
from rich.console import Console

from .config import TrainConfig, default_world_size, field_docs, validate

__all__ = ["app", "launch", "main", "under_torchrun"]

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


def under_torchrun() -> bool:
    """True when this process is one rank of a job torchrun (or commflow launch) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _worker(cfg: TrainConfig) -> dict[str, Any]:
    """One rank's whole job: train, then tear the process group down before exiting."""
    from ..dist import shutdown
    from .loop import train

    try:
        summary = train(cfg)
    except BaseException:
        shutdown(clean=False)
        raise
    shutdown(clean=True)
    return summary


def launch(cfg: TrainConfig) -> dict[str, Any]:
    """Run the job: in place under torchrun, else validate and spawn local workers.

    Returns the run summary. Raises ValueError for a bad configuration (before any
    process starts) and commflow.dist.RankFailure if a worker fails.
    """
    if under_torchrun():
        return _worker(cfg)
    from ..dist import spawn
    from .loop import new_run_dir

    world = default_world_size(cfg)
    validate(cfg, world)
    cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, out=cfg.log.out or new_run_dir()))
    # No overall timeout: a training run takes as long as it takes; a failing rank still
    # fails the whole job at once.
    return spawn(_worker, world, cfg, backend=None, init=False, timeout_s=30 * 24 * 3600)[0]


def _flag_type(tp: Any) -> Any:
    """Typer wants Optional[X], not X | None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return typing.Optional[inner]  # noqa: UP045 - typer's parser needs the typing form
    return tp


def _parameters() -> list[inspect.Parameter]:
    params, seen = [], set()
    defaults = TrainConfig()
    for section in TrainConfig.SECTIONS:
        sub = getattr(defaults, section)
        hints, docs = typing.get_type_hints(type(sub)), field_docs(type(sub))
        for f in dataclasses.fields(sub):
            if f.name in seen:
                raise RuntimeError(f"config field {f.name!r} appears in two sections; flags must be unique")
            seen.add(f.name)
            flag = f.name.replace("_", "-")
            decls = [f"--{flag}/--no-{flag}"] if hints[f.name] is bool else [f"--{flag}"]
            option = typer.Option(getattr(sub, f.name), *decls, help=docs.get(f.name, ""),
                                  rich_help_panel=section)
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=_flag_type(hints[f.name])))
    return params


def train(**flags: Any) -> None:
    """Train a hybrid Linear-Llama with sequence parallelism (default: tiny model, MQAR, 2 x 2 gloo mesh on CPU)."""
    from ..dist import RankFailure

    console = Console(stderr=True)
    cfg = TrainConfig.from_flat(**flags)
    try:
        launch(cfg)
    except ValueError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None
    except RankFailure as e:
        console.print(f"[red]training failed:[/] {e}")
        raise typer.Exit(1) from None


train.__signature__ = inspect.Signature(_parameters())
app.callback(invoke_without_command=True)(train)


def main() -> None:
    app(prog_name="commflow train")

