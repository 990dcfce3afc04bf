"""A small DDP training job with DCP checkpoints and resume, for ``commflow launch``.

The supervisor's end-to-end tests and the docs' demo run this until ``commflow train``
is available; it follows the same conventions (``--out DIR``, checkpoints under
``DIR/checkpoints/step_<N>`` written atomically every ``--ckpt-every`` steps,
``--resume`` to continue from the newest one).

The model is a two-layer MLP regressing a fixed random linear map. Step ``s`` trains on
a global batch drawn from a generator seeded with ``s`` and split evenly over the
ranks, and DDP averages the gradients, so every step equals one full-batch step of
the same model in one process (:func:`reference_params`) whatever the world size: a
job that lost, repeated or mis-resumed a step ends with different weights. A
``--compute-ms`` sleep per step gives the loop a realistic compute/communication
ratio on a shared CPU box.

    commflow launch --nproc-per-node 4 --out /tmp/run -- \\
        python -m commflow.monitor.demo --steps 60 --ckpt-every 10 --out /tmp/run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["build_model", "latest_checkpoint", "main", "reference_params"]

IN, HIDDEN = 16, 32


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))


def batch(step: int, global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (same on every rank, every world size)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(global_batch, IN, generator=g)
    w = torch.linspace(-1.0, 1.0, IN).unsqueeze(1)
    y = x @ w + 0.01 * torch.randn(global_batch, 1, generator=g)
    return x, y


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def reference_params(steps: int, *, global_batch: int = 12, lr: float = 0.05) -> torch.Tensor:
    """Train the same model for ``steps`` full-batch steps in this process; flat params."""
    model = build_model()
    opt = make_optimizer(model, lr)
    for s in range(steps):
        x, y = batch(s, global_batch)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


_STEP_DIR = re.compile(r"^step_(\d+)$")


def latest_checkpoint(ckpt_dir: str | Path) -> tuple[int, Path] | None:
    """Newest complete checkpoint ``(steps done, path)`` under ``ckpt_dir``, or None.

    Complete = renamed from its ``.tmp`` name after every rank finished writing; a
    crash mid-save leaves only the ``.tmp`` directory, which is ignored.
    """
    root = Path(ckpt_dir)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return max(found) if found else None


def _save(model, opt, steps_done: int, ckpt_dir: Path, rank: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from commflow import monitor

    with monitor.quiet("checkpoint"):
        model_sd, optim_sd = get_state_dict(model, opt)
        tmp = ckpt_dir / f"step_{steps_done:06d}.tmp"
        if rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        dist.barrier()
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        dist.barrier()  # every rank has written its part
        if rank == 0:
            os.replace(tmp, ckpt_dir / f"step_{steps_done:06d}")  # atomic on one filesystem
        dist.barrier()


def _load(model, opt, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--out", default=os.environ.get("COMMFLOW_OUT", "commflow_demo_out"))
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--global-batch", type=int, default=12)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--compute-ms", type=float, default=20.0, help="emulated compute per step (sleep)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.ckpt_every < 1:
        raise ValueError(f"--steps={args.steps} and --ckpt-every={args.ckpt_every} must be >= 1")

    from commflow import monitor
    from commflow.dist import init_distributed, shutdown

    info = init_distributed("gloo", device="cpu")
    rank, world = info.rank, info.world_size
    if args.global_batch % world:
        raise ValueError(f"--global-batch={args.global_batch} must be divisible by the world size {world}")
    out = Path(args.out)
    ckpt_dir = out / "checkpoints"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    model = nn.parallel.DistributedDataParallel(build_model())
    opt = make_optimizer(model, args.lr)
    start = 0
    if args.resume and (found := latest_checkpoint(ckpt_dir)) is not None:
        start, path = found
        _load(model, opt, path)
    log = (out / "train_log.jsonl").open("a") if rank == 0 else None
    attempt = int(os.environ.get("COMMFLOW_ATTEMPT", 0))
    if log:
        log.write(json.dumps({"event": "start", "step": start, "world": world, "attempt": attempt}) + "\n")
        log.flush()
    per_rank = args.global_batch // world
    for s in range(start, args.steps):
        monitor.step(s)
        x, y = batch(s, args.global_batch)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        time.sleep(args.compute_ms / 1e3)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()  # DDP all-reduces the gradients (traced through its comm hook)
        opt.step()
        if log:
            log.write(json.dumps({"step": s, "loss": loss.item(), "world": world, "attempt": attempt}) + "\n")
            log.flush()
        if (s + 1) % args.ckpt_every == 0 or s + 1 == args.steps:
            _save(model, opt, s + 1, ckpt_dir, rank)
    monitor.step(args.steps)
    if rank == 0:
        flat = torch.cat([q.detach().flatten() for q in model.module.parameters()])
        (out / "final.json").write_text(json.dumps({"steps": args.steps, "world": world, "attempt": attempt,
                                                    "params": flat.tolist()}))
    shutdown(clean=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
