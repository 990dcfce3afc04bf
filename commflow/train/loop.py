"""The training loop: mesh, model, data shard, step, evaluation, checkpoint, resume.

:func:`train` runs on every rank, the same under ``commflow train`` (which spawns local
workers) and under ``torchrun -m commflow.train``.

Parallel layout (a 2-D DeviceMesh ``("dp", "sp")``):

* ``sp`` ranks share one sequence: each holds ``seq_len / sp`` tokens in the model's one
  layout and runs every per-token op on them alone; attention crosses the sp group
  (commflow.sp: LASP-2 for linear layers, all-gather-KV / Ulysses / ring for softmax).
* ``dp`` ranks hold different sequences (``batch / dp`` each, the remainder spread over
  the first ranks).
* Parameters are replicated over both dimensions and every rank sees different tokens,
  so a parameter's gradient is the sum of the contributions of all ``dp x sp`` ranks.
  DDP (or FSDP2) therefore runs over the flattened ``dp x sp`` group (torchtitan's
  ``dp_shard_cp``), not over ``dp`` alone: one gradient all-reduce (or reduce-scatter)
  per bucket instead of one over dp and another over sp.
* Both average over that group, while the loss is a mean over *all* scored tokens, and
  MQAR's scored tokens are not spread evenly over the sp ranks (queries sit late in the
  sequence), nor are sequences over dp ranks when dp does not divide the batch. So each
  rank backpropagates ``loss_sum_local * world / scored_global``:
  averaged over ``world`` ranks this is exactly the gradient of the global token mean,
  the same as a single process on the whole batch (tested against one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .. import monitor
from ..dist import init_distributed
from ..sp.layout import positions as shard_positions
from .attention import SequenceParallel, prime_linear_kernels
from .checkpoint import latest_checkpoint, load_checkpoint, read_train_state, save_checkpoint
from .commtime import CommTimer
from .config import PRESETS, TrainConfig, mesh_shape, resolve_layout, validate
from .data import make_source
from .metrics import RunLog, summarize, summary_table
from .model import LinearLlama

__all__ = ["learning_rate", "new_run_dir", "train"]


def new_run_dir(root: str | Path = "runs") -> Path:
    """A fresh folder name under ``root`` (not created): ``runs/20260101-120000``, ``-2``, ..."""
    base = Path(root) / datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def learning_rate(step: int, *, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up to ``peak``, then cosine decay to 10% of it at ``total`` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _device(cfg: TrainConfig) -> str:
    if cfg.parallel.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.parallel.device


def _wrap_data_parallel(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, timer: CommTimer):
    """DDP or FSDP2 over all dp x sp ranks (see the module docstring)."""
    world = dist.get_world_size()
    if cfg.parallel.dp_mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # The model has no buffers, so DDP's per-forward buffer broadcast is a no-op.
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
        ddp.register_comm_hook(None, timer.ddp_comm_hook)
        return ddp
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    flat = _device_mesh(device.type, (world,), ("dp_sp",))
    # bf16: gather parameters in bf16 (half the traffic), reduce gradients in fp32.
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if cfg.model.dtype == "bfloat16" else MixedPrecisionPolicy())
    for layer in model.layers:
        fully_shard(layer, mesh=flat, mp_policy=mp)
    fully_shard(model, mesh=flat, mp_policy=mp)
    return model


_MESHES: dict[tuple, object] = {}


def _device_mesh(device_type: str, shape: tuple[int, ...], names: tuple[str, ...]):
    """A DeviceMesh over the default group, once per shape and default group: every mesh
    builds new process groups (and NCCL communicators), and a process may train several
    times (tests, benchmarks)."""
    world_group = dist.distributed_c10d._get_default_group()
    key = (device_type, shape, names)
    cached = _MESHES.get(key)
    if cached is None or cached[0] is not world_group:  # a new default group: new meshes
        cached = _MESHES[key] = (world_group, _mesh_from_groups(device_type, shape, names))
    return cached[1]


def _mesh_from_groups(device_type: str, shape: tuple[int, ...], names: tuple[str, ...]):
    """The mesh ``init_device_mesh`` would build, from groups every rank creates in one order.

    Why not ``init_device_mesh``: on gloo (torch 2.13) its locally synchronised sub-groups
    made about a third of 2-rank ``torchrun`` jobs abort at exit ("terminate called without
    an active exception"), also with a barrier before the teardown (1 in 16); groups made by
    plain ``new_group`` on every rank, wrapped with ``DeviceMesh.from_group``, never did
    (0 of 16). A dim spanning the whole world is the default group itself.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    grid = torch.arange(world).view(shape)
    mine = []
    for dim, size in enumerate(shape):
        if size == world:
            mine.append(dist.group.WORLD)
            continue
        chosen = None
        for line in grid.movedim(dim, -1).reshape(-1, size).tolist():
            group = dist.new_group(line)  # collective over the default group: every rank, every line
            if rank in line:
                chosen = group
        mine.append(chosen)
    groups = mine[0] if len(mine) == 1 else mine
    return DeviceMesh.from_group(groups, device_type, mesh=grid, mesh_dim_names=names)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    # Weight decay on matrices (and embeddings); not on norms' gains or biases.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def _broadcast_path(path: Path | None) -> Path:
    """Rank 0 names the run folder when none was given; every rank gets the same name."""
    box = [path if path is not None else (new_run_dir() if dist.get_rank() == 0 else None)]
    if path is None and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _check_resume(state: dict[str, Any], model_cfg: dict, cfg: TrainConfig, path: Path) -> None:
    """Refuse a checkpoint of another model or data stream (same verdict on every rank)."""
    if state["model"] != model_cfg:
        raise ValueError(f"--resume: checkpoint {path} holds a different model {state['model']} than this "
                         f"configuration {model_cfg}; resume with the same --preset/--pattern/--layers")
    mine = _data_identity(cfg)
    if state["data"] != mine:
        raise ValueError(f"--resume: checkpoint {path} was trained on data {state['data']}, this run asks for "
                         f"{mine}; the data order would change (keep --data, --seq-len, --batch, --seed, MQAR flags)")


def _data_identity(cfg: TrainConfig) -> dict[str, Any]:
    d = cfg.data
    return {"data": None if d.data is None else str(d.data), "seq_len": d.seq_len, "batch": d.batch,
            "mqar_pairs": d.mqar_pairs, "mqar_vocab": d.mqar_vocab, "seed": d.seed}


def _reduce(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train on this rank; returns the run summary (rank 0's numbers, on every rank)."""
    device_type = _device(cfg)
    info = init_distributed(device=device_type)
    world, rank, device = info.world_size, info.rank, info.device
    model_cfg = validate(cfg, world)  # raises the same ValueError on every rank, before any collective
    dp, sp = mesh_shape(cfg, world)
    layout = resolve_layout(cfg, model_cfg.pattern)
    out = _broadcast_path(cfg.log.out)
    ckpt_dir = out / "checkpoints"

    mesh = _device_mesh(device.type, (dp, sp), ("dp", "sp"))
    dp_rank, sp_rank = mesh.get_local_rank("dp"), mesh.get_local_rank("sp")
    plan = SequenceParallel(group=mesh.get_group("sp"), softmax=cfg.parallel.softmax_sp, layout=layout)

    torch.manual_seed(cfg.data.seed)  # identical initial weights on every rank
    with torch.device(device):  # initialised where it runs: a 1B model's init on CPU takes a while
        model = LinearLlama(model_cfg, plan, activation_checkpoint=cfg.parallel.activation_checkpoint)
    n_params = sum(p.numel() for p in model.parameters())
    timer = CommTimer(device).install()
    model = _wrap_data_parallel(model, cfg, device, timer)
    peak_lr = cfg.optim.lr if cfg.optim.lr is not None else PRESETS[cfg.model.preset].lr
    optimizer = _optimizer(model, cfg, peak_lr)
    model_identity = dataclasses.asdict(model_cfg)

    start_step, resumed_from = 0, None
    if cfg.checkpoint.resume:
        path = latest_checkpoint(ckpt_dir)
        if path is not None:
            _check_resume(read_train_state(path), model_identity, cfg, path)
            with monitor.quiet("resume"):
                start_step = load_checkpoint(path, model, optimizer)["step"]
            resumed_from = path
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    train_src, eval_src = make_source(cfg, "train"), make_source(cfg, "eval")
    pos_cpu = shard_positions(cfg.data.seq_len, sp_rank, sp, layout)  # global positions of this rank's tokens
    pos = pos_cpu.to(device)
    # Sequences [first, first + count) of every global batch are this dp rank's; the split
    # may be uneven (a restart on an odd world): the loss scaling below stays exact.
    share, extra = divmod(cfg.data.batch, dp)
    first_example = dp_rank * share + min(dp_rank, extra)
    local_batch = share + (1 if dp_rank < extra else 0)
    scored_per_step = cfg.data.batch * train_src.labels_per_sequence  # known without communication
    loss_scale = world / scored_per_step
    tokens_per_step = cfg.data.batch * cfg.data.seq_len
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.model.dtype == "bfloat16"
                else contextlib.nullcontext())
    if "L" in model_cfg.pattern:
        # Every Triton kernel of the linear layers loaded now, while nothing is in flight:
        # a first load beside a pending collective can hang all ranks (lasp2.prime_kernels).
        prime_linear_kernels(plan, batch=local_batch, heads=model_cfg.n_heads, head_dim=model_cfg.head_dim,
                             linear_decay=model_cfg.linear_decay,
                             dtype=torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32,
                             device=device)

    def examples(first: int) -> list[int]:
        return list(range(first + first_example, first + first_example + local_batch))

    def evaluate() -> tuple[float, float]:
        model.eval()
        sums = [0.0, 0.0, 0.0]
        with torch.no_grad(), autocast:
            for b in range(cfg.log.eval_batches):
                batch = eval_src.batch(examples(b * cfg.data.batch), pos_cpu)
                res = model(batch.inputs.to(device), pos, batch.labels.to(device))
                sums = [s + float(v) for s, v in zip(sums, (res.loss_sum, res.correct, res.count))]
        model.train()
        loss_sum, correct, count = _reduce(sums, device)
        return loss_sum / count, correct / count

    log = RunLog(out, total_steps=cfg.optim.steps, start_step=start_step, progress=cfg.log.progress,
                 enabled=rank == 0)
    if resumed_from is not None:
        log.print(f"resumed from {resumed_from} at step {start_step}")
    elif cfg.checkpoint.resume:
        log.print(f"no checkpoint in {ckpt_dir}; starting at step 0")
    last_ckpt = resumed_from
    t_start = time.perf_counter()
    step = start_step
    try:
        for step in range(start_step, cfg.optim.steps):
            monitor.step(step)  # the health monitor's iteration (no-op unless `commflow launch` watches)
            timer.step_begin()
            t0 = time.perf_counter()
            lr = learning_rate(step, peak=peak_lr, warmup=cfg.optim.warmup, total=cfg.optim.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = train_src.batch(examples(step * cfg.data.batch), pos_cpu)
            inputs, labels = batch.inputs.to(device, non_blocking=True), batch.labels.to(device, non_blocking=True)
            with autocast:
                res = model(inputs, pos, labels)
            (res.loss_sum * loss_scale).backward()
            timer.backward_done()
            # The norm is logged too: Adam is invariant to a uniform gradient scale, so the
            # norm is what shows that gradients are summed over exactly the right ranks.
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum, correct, count = _reduce([res.loss_sum.item(), float(res.correct), float(res.count)], device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_time = time.perf_counter() - t0
            comm = timer.step_end()
            done = step + 1
            record = {"step": done, "loss": loss_sum / count, "acc": correct / count,
                      "tokens_per_s": tokens_per_step / step_time, "comm_frac": min(1.0, comm / step_time),
                      "step_time_s": step_time, "lr": lr, "grad_norm": float(grad_norm),
                      "elapsed_s": time.perf_counter() - t_start}
            is_last = done == cfg.optim.steps
            if cfg.log.eval_batches and ((cfg.log.eval_every and done % cfg.log.eval_every == 0) or is_last):
                with monitor.quiet("eval"):
                    record["eval_loss"], record["eval_acc"] = evaluate()
            logged = done % cfg.log.log_every == 0 or is_last or "eval_acc" in record
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"loss is {record['loss']} at step {done}; lower --lr?")
            log.step(record, write=logged, show=logged and not cfg.log.progress)
            if cfg.checkpoint.ckpt_every and (done % cfg.checkpoint.ckpt_every == 0 or is_last):
                with monitor.quiet("checkpoint"):
                    last_ckpt = save_checkpoint(ckpt_dir, done, model, optimizer,
                                                {"model": model_identity, "data": _data_identity(cfg)},
                                                keep=cfg.checkpoint.keep)
    finally:
        log.close()
        timer.uninstall()

    summary = {
        "preset": cfg.model.preset, "pattern": model_cfg.pattern, "params": n_params, "dp": dp, "sp": sp,
        "dp_mode": cfg.parallel.dp_mode, "softmax_sp": cfg.parallel.softmax_sp, "layout": layout,
        "device": str(device.type), "world_size": world,
        "data": str(cfg.data.data) if cfg.data.data else
        f"MQAR ({cfg.data.mqar_pairs} pairs, vocab {cfg.data.mqar_vocab}, seq {cfg.data.seq_len}, batch {cfg.data.batch})",
        "start_step": start_step, "steps": cfg.optim.steps, "wall_s": time.perf_counter() - t_start,
        "out": str(out), "metrics": str(out / "metrics.jsonl"), "checkpoint": str(last_ckpt) if last_ckpt else None,
        **summarize(log.records),
    }
    if rank == 0:
        log.console.print(summary_table(summary))
    box = [summary]
    dist.broadcast_object_list(box, src=0)
    return box[0]
