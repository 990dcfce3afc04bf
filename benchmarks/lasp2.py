"""LASP-2 against LASP-1, ring K/V passing and the compute limit, for causal linear attention.

Work is a list of *steps* run in order by every rank of a world (``--nprocs``), in two
phases that are meant as two commands on the GPU machine (``--phase``):

``check`` (quick): every path (LASP-2 with the fold and in the paper's overlapped order,
zigzag, both LASP-1 orders, ring K/V, the local kernel, fla's own ``chunk_simple_gla``)
with every kernel backend (``fla`` = fla + commflow's Triton kernels, ``fla-only`` = fla +
the torch formulation, ``torch``) and every decay mode, ONE step each at a small size:
forward and gradients against the float64 reference on the same (rounded) inputs. Triton
autotuning is off here (``--check-autotune``: one configuration per kernel, untimed,
uncached; fla would otherwise time up to 48 compiles per kernel). Then on GPU a *smoke*
step per method at one realistic length (one warm-up, two runs, untuned: it proves that
every path runs over NCCL; its times are not for reporting) and LASP-2H at that length.
``bench``: the sweep: fwd+bwd time (median over ``--iters``, slowest rank) and peak memory
per GPU of each method at each total length, ``local`` being the local kernel alone at the
per-GPU length (the compute limit), autotuned (``--autotune``, default ``limited``); then a
*re-check* of the ``fla`` paths of the sweep's decay mode with the configurations the sweep
tuned; then ``--hybrid`` (LASP-2H: causal ``allgather_attention`` per rank, contiguous vs
zigzag, beside the count of causal pairs); then fla's own context parallelism
(``fla-cp-gdn``: gated DeltaNet, forward, beside ``fla-gdn-local-fwd``).
``all`` (default): check, then bench (no smoke steps).

Nothing is silent and nothing hangs for good:

* every step is announced on stdout with the time since the start, every finished row is
  printed and appended (flushed) to ``--partial`` at once, and phase changes are logged;
* every rank writes its own progress (``progress_w<W>_rank<r>.jsonl``) and a watchdog
  per rank writes the stacks of all its threads (``stacks_w<W>_rank<r>.txt``) when a step
  runs past ``--stack-every`` seconds (``faulthandler.dump_traceback_later``, repeating)
  and when the rank is terminated, all in ``--debug-dir``;
* a step past ``--step-timeout`` ends its rank (after a last stack dump); the parent then
  records the step as ``timeout`` and starts a fresh world at the next step (at most
  ``--max-restarts`` times); the sweep skips longer lengths of a method that timed out or
  ran out of memory;
* ``--time-limit`` bounds the whole run: steps not started by then are recorded as not run,
  and the result file is written either way.

``python -m benchmarks lasp2 --device cpu --nprocs 2 --tiny`` runs everything end to end on
CPU at toy sizes. ``python -m benchmarks.lasp2 report RESULT.json`` writes docs/lasp2_results.md
and docs/img/lasp2_*.png.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from commflow.dist import RankFailure, init_distributed, spawn

from .registry import register
from .report import load_result, pyplot, report_main, report_paths, save_figure, write_markdown
from .timing import max_over_ranks, peak_memory_gib, time_ms

METHODS = ("lasp2", "lasp2-overlap", "lasp2-zigzag", "lasp1", "lasp1-serial", "ring", "local", "fla-local", "fla-cp-gdn")
CHECK_METHODS = ("lasp2", "lasp2-overlap", "lasp2-zigzag", "lasp1", "lasp1-serial", "ring", "local", "fla-local")
CHECK_TOL = 3e-2  # bf16 inputs, bf16 tiles: max |err| / max |reference| per tensor
CPU_CHECK_TOL = 1e-4  # float32 on CPU
ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- inputs and methods


def _inputs(B, S, H, D, decay, dtype, device, seed, requires_grad=True):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    q, k, v, do = rnd(B, S, H, D, scale=D**-0.5), rnd(B, S, H, D, scale=D**-0.5), rnd(B, S, H, D), rnd(B, S, H, D)
    g = torch.nn.functional.logsigmoid(torch.randn(B, S, H, generator=gen) + 4.0).to(device) if decay == "g" else None
    g_gamma = (-torch.rand(H, generator=gen) * 0.05).to(device) if decay == "gamma" else None
    leaves = [t.requires_grad_(requires_grad) for t in (q, k, v)] + ([g.requires_grad_(requires_grad)] if g is not None
                                                                     else [])
    return leaves, g_gamma, do


def _linear_method(name, kernels):
    """``fn(q, k, v, g, g_gamma) -> o`` on this rank's shard (contiguous, or zigzag for lasp2-zigzag)."""
    from commflow.sp import lasp2_attention
    from commflow.sp.linear_kernels import chunk_linear_attention

    from .linear_sp_baselines import lasp1_attention, ring_kv_attention

    # The inputs are valid by construction: no per-call host sync for the sign of g (baselines alike).
    opts = {"kernels": kernels, "check_decay_sign": False}
    if name == "lasp2":
        return lambda q, k, v, g, gg: lasp2_attention(q, k, v, g=g, g_gamma=gg, **opts)
    if name == "lasp2-overlap":
        return lambda q, k, v, g, gg: lasp2_attention(q, k, v, g=g, g_gamma=gg, forward_overlap=True, **opts)
    if name == "lasp2-zigzag":
        return lambda q, k, v, g, gg: lasp2_attention(q, k, v, g=g, g_gamma=gg, layout="zigzag", **opts)
    if name == "lasp1":
        return lambda q, k, v, g, gg: lasp1_attention(q, k, v, g=g, g_gamma=gg, kernels=kernels)
    if name == "lasp1-serial":
        return lambda q, k, v, g, gg: lasp1_attention(q, k, v, g=g, g_gamma=gg, kernels=kernels, serial_compute=True)
    if name == "ring":
        return lambda q, k, v, g, gg: ring_kv_attention(q, k, v, g=g, g_gamma=gg, kernels=kernels)
    if name == "local":
        return lambda q, k, v, g, gg: chunk_linear_attention(q, k, v, g=g, g_gamma=gg, kernels=kernels)[0]
    if name == "fla-local":
        from fla.ops.simple_gla import chunk_simple_gla

        return lambda q, k, v, g, gg: chunk_simple_gla(q, k, v, g=g, g_gamma=gg)[0]
    raise ValueError(f"unknown method {name!r}")


def _step_fn(fn, leaves, g_gamma, do, backward=True):
    def run():
        q, k, v = leaves[:3]
        g = leaves[3] if len(leaves) > 3 else None
        if not backward:
            with torch.no_grad():
                return fn(q, k, v, g, g_gamma)
        o = fn(q, k, v, g, g_gamma)
        return torch.autograd.grad(o, leaves, do)

    return run


def _all_ok(ok: bool, device) -> bool:
    """Every rank agrees the method ran (a failure anywhere marks the row on every rank)."""
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _timed(run, device, warmup, iters) -> tuple[dict, str | None]:
    cuda = torch.device(device).type == "cuda"
    err = None
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t = time_ms(run, warmup=warmup, iters=iters, device=device, barrier=True)
    except Exception as e:  # noqa: BLE001 - recorded in the row (OOM, refused kernel, ...)
        t, err = None, f"{type(e).__name__}: {str(e)[:300]}"
    ok = _all_ok(err is None, device)
    if not ok:
        return {}, err or "failed on another rank"
    out = {"ms": max_over_ranks(t["median_ms"]), "ms_min_rank": -max_over_ranks(-t["median_ms"])}
    mem = peak_memory_gib(device)
    if mem is not None:
        out["peak_gib"] = max_over_ranks(mem)
    return out, None


def _rel(mine, ref) -> float:
    return ((mine.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- the plan


def plan(cfg: dict, world: int) -> list[dict]:
    """The steps of one world, in order (the same list on every rank and in the parent)."""
    cuda = cfg["device"] == "cuda"
    steps: list[dict] = []
    backends = ["fla", "fla-only", "torch"] if cuda else ["torch"]
    core = [m for m in cfg["methods"] if m != "fla-cp-gdn" and (cuda or not m.startswith("fla"))]

    def checks(kind, decays, backends, heads):
        for decay in decays:
            for backend in backends:
                for method in CHECK_METHODS:
                    if method == "fla-local" and (backend != "fla" or not cuda):
                        continue
                    steps.append({"kind": kind, "id": f"{kind}/{decay}/{backend}/{method}", "decay": decay,
                                  "backend": backend, "method": method, "heads": heads})

    def timed(kind, seq, methods, phases_of):
        for method in methods:
            for phase in phases_of(method):
                steps.append({"kind": kind, "id": f"{kind}/{seq}/{method}/{phase}", "seq": seq, "method": method,
                              "phase": phase})

    def hybrid(kind, seqs):
        for seq in seqs:
            for layout in ("contiguous", "zigzag"):
                steps.append({"kind": kind, "id": f"{kind}/{seq}/{layout}", "seq": seq, "layout": layout})

    def fla_cp(kind, seqs):
        for seq in seqs:
            for method, cp in (("fla-cp-gdn-fwd", world > 1), ("fla-gdn-local-fwd", False)):
                steps.append({"kind": kind, "id": f"{kind}/{seq}/{method}", "seq": seq, "method": method, "cp": cp})

    ok = [s for s in cfg["seqs"] if s % (2 * world) == 0]
    smoke_ok = cfg["smoke_seq"] % (2 * world) == 0
    if cfg["phase"] in ("check", "all") and cfg["check"]:
        checks("check", ("none", "gamma", "g"), backends, cfg["check_heads"])
    if cfg["phase"] == "check" and cuda and smoke_ok:
        timed("smoke", cfg["smoke_seq"], core, lambda m: ("fwd+bwd",))
        if cfg["hybrid"] and world > 1:
            hybrid("hybrid-smoke", [cfg["smoke_seq"]])
        if "fla-cp-gdn" in cfg["methods"]:
            fla_cp("fla-cp-smoke", [cfg["smoke_seq"]])
    if cfg["phase"] in ("bench", "all"):
        for seq in ok:
            # Forward alone only where the fla CP comparison needs it.
            timed("sweep", seq, core, lambda m: ("fwd+bwd", "fwd") if m in ("lasp2", "local") else ("fwd+bwd",))
        if cuda and cfg["recheck"] and ok:
            checks("recheck", (cfg["decay"],), ["fla"], cfg["heads"])
        if cfg["hybrid"] and world > 1:
            hybrid("hybrid", [s for s in cfg["hybrid_seqs"] if s % (2 * world) == 0])
        if "fla-cp-gdn" in cfg["methods"] and cuda:
            fla_cp("fla-cp", ok)
    for i, s in enumerate(steps):
        s["index"] = i
    return steps


# ----------------------------------------------------------------------------- progress and watchdog


class _Log:
    """Rows and progress, flushed as they happen: rank 0 prints and appends rows (to the
    world's row file, which the parent reads, and to ``--partial``); every rank appends its
    step events to its own progress file."""

    def __init__(self, cfg, run_dir: Path, world: int, rank: int, n_steps: int):
        self.t0, self.world, self.rank, self.n = cfg["t0"], world, rank, n_steps
        self.row_files = [run_dir / f"rows_w{world}.jsonl"] + ([Path(cfg["partial"])] if cfg.get("partial") else [])
        self.progress = (run_dir / f"progress_w{world}_rank{rank}.jsonl").open("a", buffering=1)

    def stamp(self) -> float:
        return round(time.time() - self.t0, 1)

    def step(self, index: int, step_id: str, event: str, **extra) -> None:
        self.progress.write(json.dumps({"t": self.stamp(), "i": index, "id": step_id, "event": event, **extra}) + "\n")
        self.progress.flush()
        if self.rank == 0 and event == "start":
            print(f"[{self.stamp():7.1f}s] W={self.world} step {index + 1}/{self.n} {step_id}", flush=True)

    def row(self, row: dict) -> None:
        if self.rank == 0:
            _emit(row, self.row_files, self.stamp())

    def event(self, text: str, **extra) -> None:
        if self.rank == 0:
            _emit({"event": text, "world": self.world, **extra}, self.row_files[1:], self.stamp(), stdout_json=False)


def _emit(record: dict, files, stamp: float, stdout_json: bool = True) -> None:
    record = {**record, "t": stamp}
    line = json.dumps(record, default=str)
    print(line if stdout_json else f"[{stamp:7.1f}s] {record.get('event')}", flush=True)
    for path in files:
        with Path(path).open("a") as f:
            f.write(line + "\n")
            f.flush()


class _Watchdog:
    """Per rank: all threads' stacks to a file when a step runs long (repeating), when the
    rank is terminated (SIGTERM) and when a step passes its deadline, which also ends the
    rank (exit code 124) so that the parent can start a new world after the step."""

    def __init__(self, path: Path, log: _Log, dump_every: float):
        self.file = path.open("a")
        self.log, self.dump_every = log, dump_every
        self.current: tuple | None = None
        self.lock = threading.Lock()
        faulthandler.register(signal.SIGTERM, file=self.file, all_threads=True, chain=True)
        threading.Thread(target=self._watch, daemon=True, name="lasp2-watchdog").start()

    def begin(self, index: int, step_id: str, timeout: float) -> None:
        self.file.write(f"--- t={self.log.stamp()}s rank {self.log.rank}: step {index} {step_id} "
                        f"(deadline {timeout:.0f} s)\n")
        self.file.flush()
        faulthandler.dump_traceback_later(min(self.dump_every, timeout), repeat=True, file=self.file)
        with self.lock:
            self.current = (index, step_id, time.monotonic() + timeout, timeout)

    def end(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        with self.lock:
            self.current = None

    def close(self) -> None:
        self.end()
        faulthandler.unregister(signal.SIGTERM)
        self.file.close()

    def _watch(self) -> None:
        while True:
            time.sleep(0.5)
            with self.lock:
                cur = self.current
            if cur is not None and time.monotonic() > cur[2]:
                index, step_id, _, timeout = cur
                self.file.write(f"=== t={self.log.stamp()}s rank {self.log.rank}: step {index} {step_id} passed its "
                                f"{timeout:.0f} s deadline; stacks of all threads, then exit 124\n")
                self.file.flush()
                faulthandler.dump_traceback(self.file, all_threads=True)
                self.file.flush()
                self.log.step(index, step_id, "timeout")
                os._exit(124)


def _simulated_hang() -> None:
    """``--debug-hang``: block this rank for good (tests the watchdog and the restart)."""
    threading.Event().wait()


# ----------------------------------------------------------------------------- steps


class _State:
    """What a rank keeps between steps: inputs of the current size, check references."""

    def __init__(self):
        self.inputs_key, self.inputs = None, None
        self.refs: dict = {}

    def sweep_inputs(self, cfg, info, s_local):
        key = (s_local, cfg["decay"])
        if self.inputs_key != key:
            self.inputs = None  # free the previous size first
            if info.device.type == "cuda":
                torch.cuda.empty_cache()
            self.inputs = _inputs(cfg["batch"], s_local, cfg["heads"], cfg["head_dim"], cfg["decay"],
                                  getattr(torch, cfg["dtype"]), info.device, seed=1)
            self.inputs_key = key
        return self.inputs

    def check_reference(self, cfg, info, decay, heads):
        """Global inputs (rounded to the run dtype) and the float64 reference ``[o, dq, dk, dv, (dg)]``."""
        from commflow.sp.linear_reference import linear_attention_naive

        key = (decay, heads)
        if key not in self.refs:
            self.refs.clear()
            S = cfg["check_seq_local"] * info.world_size
            leaves, g_gamma, do = _inputs(2, S, heads, cfg["head_dim"], decay, getattr(torch, cfg["dtype"]),
                                          info.device, seed=123, requires_grad=False)
            ref_leaves = [t.double().requires_grad_() for t in leaves]
            o_ref, _ = linear_attention_naive(*ref_leaves[:3], g=ref_leaves[3] if decay == "g" else None,
                                              g_gamma=None if g_gamma is None else g_gamma.double())
            ref = [o_ref.detach(), *torch.autograd.grad(o_ref, ref_leaves, do.double())]
            self.refs[key] = (leaves, g_gamma, do, ref)
        return self.refs[key]


def _check_step(step, cfg, info, state) -> dict:
    """One path vs the float64 reference on the same inputs (rounded to the run dtype)."""
    from commflow.sp import shard
    from commflow.sp.linear_kernels import select_kernels

    dev, decay, backend, method = info.device, step["decay"], step["backend"], step["method"]
    tol = CHECK_TOL if dev.type == "cuda" else CPU_CHECK_TOL
    leaves, g_gamma, do, ref = state.check_reference(cfg, info, decay, step["heads"])
    row = {"world": info.world_size, "decay": decay, "backend": backend, "method": method, "heads": step["heads"]}
    if step["kind"] == "recheck":
        row["tuned"] = True
    layout = "zigzag" if method == "lasp2-zigzag" else "contiguous"
    glob = method in ("local", "fla-local")  # one GPU runs the whole sequence
    try:
        kernels = select_kernels(dev, backend=backend, chunk_size=cfg["chunk_size"] if backend == "torch" else None)
        mine = [t.detach().clone() if glob else shard(t.detach(), layout=layout) for t in leaves]
        mine = [t.requires_grad_() for t in mine]
        d_o = do if glob else shard(do, layout=layout)
        fn = _linear_method(method, kernels)
        with _tuned_occupancy(step, cfg):
            o = fn(*mine[:3], mine[3] if decay == "g" else None, g_gamma)
            got = [o, *torch.autograd.grad(o, mine, d_o)]
        want = ref if glob else [shard(t, layout=layout) for t in ref]
        names = ["o", "dq", "dk", "dv", "dg"][: len(got)]
        row["errors"] = {n: _rel(a, b) for n, a, b in zip(names, got, want)}
        row["tol"] = tol
        row["pass"] = all(e < tol for e in row["errors"].values())
    except Exception as e:  # noqa: BLE001 - a refused or broken path is a row, not a crash
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        row["pass"] = False
    row["pass"] = _all_ok(row["pass"], dev)
    if method == "fla-local" and "#640" in row.get("error", ""):
        row["pass"], row["refused"] = None, True  # fla's own guard: not a path we ship
    return row


def _tuned_occupancy(step, cfg):
    """A re-check runs commflow's kernels under the autotune entry the sweep used (their key
    has an occupancy bucket; the check's small problem would otherwise pick bucket 0)."""
    if step["kind"] != "recheck":
        return contextlib.nullcontext()
    from commflow.sp import linear_triton

    s_local = min(s for s in cfg["seqs"]) // cfg["world"]
    bucket = min(4, -(-s_local // 64) * cfg["batch"] * cfg["heads"] // 512)
    return linear_triton.force_occupancy(bucket)


def _timed_step(step, cfg, info, state) -> dict:
    from commflow.sp.linear_kernels import select_kernels

    world, dev, seq, method = info.world_size, info.device, step["seq"], step["method"]
    s_local = seq // world
    kernels = select_kernels(dev, backend=cfg["backend"], chunk_size=cfg["chunk_size"])
    row = {"world": world, "seq": seq, "seq_local": s_local, "method": method, "phase": step["phase"],
           "decay": cfg["decay"], "heads": cfg["heads"], "head_dim": cfg["head_dim"], "batch": cfg["batch"],
           "backend": kernels.name}
    smoke = step["kind"] == "smoke"
    warmup, iters = (1, 2) if smoke else (cfg["warmup"], cfg["iters"])
    if smoke:
        row["smoke"] = True  # untuned kernels, two runs: proves the path runs, not a number to report
    try:
        leaves, g_gamma, do = state.sweep_inputs(cfg, info, s_local)
        run = _step_fn(_linear_method(method, kernels), leaves, g_gamma, do, backward=step["phase"] == "fwd+bwd")
        err = None
    except Exception as e:  # noqa: BLE001 - e.g. OOM while making the inputs: a row, not a crash
        run, err = None, f"{type(e).__name__}: {str(e)[:300]}"
    if _all_ok(err is None, dev):
        timing, err = _timed(run, dev, warmup, iters)
        row.update(timing)
    if err:
        row["error"] = err
        if method == "fla-local" and "#640" in err:
            row["refused"] = True  # fla's own guard (gated backward on Hopper + Triton 3.6)
    return row


def _fla_gdn(cfg, info, s_local, cp: bool):
    """fla's gated DeltaNet, with its own context parallelism (``cp``) or locally; forward only."""
    import torch.nn.functional as F
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    B, H, D, dev = 1, cfg["heads"], cfg["head_dim"], info.device
    dtype = getattr(torch, cfg["dtype"])
    gen = torch.Generator(device="cpu").manual_seed(7)
    q = torch.randn(B, s_local, H, D, generator=gen).to(dev, dtype)
    k = F.normalize(torch.randn(B, s_local, H, D, generator=gen), dim=-1).to(dev, dtype)
    v = torch.randn(B, s_local, H, D, generator=gen).to(dev, dtype)
    g = F.logsigmoid(torch.randn(B, s_local, H, generator=gen) + 4.0).to(dev)
    beta = torch.rand(B, s_local, H, generator=gen).sigmoid().to(dev, dtype)
    kwargs = {}
    if cp:
        from fla.ops.cp import build_cp_context

        total = s_local * info.world_size
        cu = torch.tensor([0, total], dtype=torch.long)
        kwargs["cp_context"] = build_cp_context(cu_seqlens=cu.to(dev), cu_seqlens_cpu=cu, group=dist.group.WORLD)

    def run():
        with torch.no_grad():
            return chunk_gated_delta_rule(q, k, v, g, beta, **kwargs)[0]

    return run


def _fla_cp_step(step, cfg, info, state) -> dict:
    world, dev, seq = info.world_size, info.device, step["seq"]
    s_local = seq // world
    row = {"world": world, "seq": seq, "seq_local": s_local, "method": step["method"], "phase": "fwd",
           "decay": "g", "heads": cfg["heads"], "head_dim": cfg["head_dim"], "batch": 1}
    smoke = step["kind"] == "fla-cp-smoke"
    if smoke:
        row["smoke"] = True
    state.inputs_key = state.inputs = None  # the linear-attention inputs are not needed here
    try:
        run, err = _fla_gdn(cfg, info, s_local, step["cp"]), None
    except Exception as e:  # noqa: BLE001 - fla missing / API mismatch: a row, not a crash
        run, err = None, f"{type(e).__name__}: {str(e)[:300]}"
    if _all_ok(err is None, dev):
        timing, err = _timed(run, dev, *((1, 2) if smoke else (cfg["warmup"], cfg["iters"])))
        row.update(timing)
    if err:
        row["error"] = err
    return row


def _hybrid_step(step, cfg, info, state) -> dict:
    """Causal softmax (all-gather K/V) per rank under one layout: LASP-2H's layout cost."""
    from commflow.sp import allgather_attention
    from commflow.sp.hybrid import load_imbalance, softmax_pairs_per_rank

    world, dev, seq, layout = info.world_size, info.device, step["seq"], step["layout"]
    dtype = getattr(torch, cfg["dtype"])
    row = {"world": world, "seq": seq, "layout": layout, "heads": cfg["heads"], "head_dim": cfg["head_dim"]}
    smoke = step["kind"] == "hybrid-smoke"
    warmup, iters = (1, 2) if smoke else (cfg["warmup"], cfg["iters"])
    if smoke:
        row["smoke"] = True
    row["pairs_imbalance"] = load_imbalance(softmax_pairs_per_rank(seq, world, layout))
    state.inputs_key = state.inputs = None
    err = None
    try:
        leaves, _, do = _inputs(cfg["batch"], seq // world, cfg["heads"], cfg["head_dim"], "none", dtype, dev, seed=3)

        def fn(q, k, v, g, gg):
            return allgather_attention(q, k, v, causal=True, layout=layout)

        fwd = time_ms(_step_fn(fn, leaves, None, do, backward=False), warmup=warmup, iters=iters, device=dev,
                      barrier=True)["median_ms"]
    except Exception as e:  # noqa: BLE001
        fwd, err = None, f"{type(e).__name__}: {str(e)[:300]}"
    if _all_ok(err is None, dev):
        per_rank = [None] * world
        dist.all_gather_object(per_rank, fwd)
        row["fwd_ms_per_rank"] = per_rank
        row["fwd_imbalance"] = load_imbalance(per_rank)
        both, err = _timed(_step_fn(fn, leaves, None, do), dev, warmup, iters)
        row.update({"fwd_bwd_" + key: val for key, val in both.items()})
    if err:
        row["error"] = err
    return row


_RUNNERS = {"check": _check_step, "recheck": _check_step, "smoke": _timed_step, "sweep": _timed_step,
            "hybrid": _hybrid_step, "hybrid-smoke": _hybrid_step, "fla-cp": _fla_cp_step, "fla-cp-smoke": _fla_cp_step}


def _autotune_for(step, cfg) -> str:
    return cfg["check_autotune"] if step["kind"] in ("check", "smoke", "hybrid-smoke", "fla-cp-smoke") else cfg["autotune"]


# ----------------------------------------------------------------------------- worker


def _prepare(cfg, info) -> None:
    """Before any step, on every rank: one collective on the device (it creates the group's
    NCCL communicator on every rank at once: batched point-to-point ops need it), then the
    self-checks of commflow's Triton kernels with ONE agreement, so every rank takes the same
    kernel path."""
    _all_ok(True, info.device)
    if info.device.type == "cuda" and cfg["backend"] in (None, "auto", "fla"):
        from commflow.sp import linear_triton
        from commflow.sp.linear_kernels import fla_available

        if fla_available():
            with linear_triton.autotune_mode(cfg["check_autotune"]):
                linear_triton.prime(info.device, getattr(torch, cfg["dtype"]), cfg["head_dim"], cfg["head_dim"], 64)


def _agree(flag: bool) -> bool:
    """True on every rank if it is true on any (a CPU all-reduce: gloo, any backend)."""
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _worker(cfg: dict, steps: list[dict], start: int, run_dir: str, dead: list[str]) -> dict:
    from commflow.sp import linear_triton

    info = init_distributed(device=cfg["device"])
    world, rank = info.world_size, info.rank
    run_dir = Path(run_dir)
    log = _Log(cfg, run_dir, world, rank, len(steps))
    dog = _Watchdog(run_dir / f"stacks_w{world}_rank{rank}.txt", log, cfg["stack_every"])
    cfg = {**cfg, "world": world}
    log.step(-1, "prepare", "start")
    log.event(f"W={world}: prepare (NCCL communicator, Triton self-checks)" + (f", resuming at step {start + 1}"
                                                                                 if start else ""))
    dog.begin(-1, "prepare", max(5.0, min(cfg["prepare_timeout"], cfg["deadline"] + 20 - time.time())))
    _prepare(cfg, info)
    dog.end()
    log.step(-1, "prepare", "end")
    state, dead, phase, done = _State(), set(dead), None, 0
    for step in steps[start:]:
        i = step["index"]
        if _agree(time.time() > cfg["deadline"]):
            log.event(f"W={world}: time limit reached before step {i + 1}/{len(steps)}; stopping")
            break
        if step["kind"] != phase:
            phase = step["kind"]
            log.event(f"W={world}: phase {phase}")
        if step["kind"] == "sweep" and step["method"] in dead:
            log.row({"world": world, "kind": "sweep", "id": step["id"], "seq": step["seq"], "method": step["method"],
                     "phase": step["phase"], "status": "skipped", "error": "failed at a shorter length"})
            continue
        log.step(i, step["id"], "start")
        # A step may not run far past the time limit either: its deadline is the earlier one.
        dog.begin(i, step["id"], max(5.0, min(cfg["step_timeout"], cfg["deadline"] + 20 - time.time())))
        t_step = time.perf_counter()
        if cfg.get("debug_hang") == f"{step['id']}@{rank}":
            _simulated_hang()
        with linear_triton.autotune_mode(_autotune_for(step, cfg)):
            row = _RUNNERS[step["kind"]](step, cfg, info, state)
        dog.end()
        row = {"kind": step["kind"], "id": step["id"], **row, "step_s": round(time.perf_counter() - t_step, 2)}
        row["status"] = ("fail" if row.get("pass") is False else "refused" if row.get("refused")
                         else "error" if row.get("error") else "ok")
        log.step(i, step["id"], "end", status=row["status"])
        log.row(row)
        done += 1
        if step["kind"] == "sweep" and step["phase"] == "fwd+bwd" and "OutOfMemory" in row.get("error", ""):
            dead.add(step["method"])
    dog.close()
    with contextlib.suppress(Exception):  # every op has completed: a clean NCCL shutdown
        dist.barrier()
        dist.destroy_process_group()
    return {"rank": rank, "steps_done": done}


# ----------------------------------------------------------------------------- runner


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
            out.append(json.loads(line))
    return out


def _stuck_step(run_dir: Path, world: int) -> tuple[int | None, str]:
    """The earliest step that some rank started and did not finish, and whether a watchdog
    fired (``"timeout"``) or the rank just died (``"died"``)."""
    stuck, why = [], "died"
    for rank in range(world):
        events = _read_jsonl(run_dir / f"progress_w{world}_rank{rank}.jsonl")
        if events and events[-1]["event"] in ("start", "timeout"):
            stuck.append(events[-1]["i"])
            if events[-1]["event"] == "timeout":
                why = "timeout"
    return (min(stuck) if stuck else None), why


def _run_world(cfg: dict, nproc: int, run_dir: Path) -> dict:
    steps = plan(cfg, nproc)
    for name in [f"rows_w{nproc}.jsonl"] + [f"progress_w{nproc}_rank{r}.jsonl" for r in range(nproc)]:
        (run_dir / name).unlink(missing_ok=True)
    rows_file = run_dir / f"rows_w{nproc}.jsonl"
    start, restarts, failures, dead = 0, 0, [], []
    while start < len(steps):
        remaining = cfg["deadline"] - time.time()
        if remaining <= 0:
            break
        try:
            spawn(_worker, nproc, cfg, steps, start, str(run_dir), dead, backend=None, init=False,
                  timeout_s=remaining + cfg["prepare_timeout"] + 30)
            break
        except RankFailure as e:
            index, why = _stuck_step(run_dir, nproc)
            if "timed out" in str(e).splitlines()[0]:  # the whole world passed the time limit
                why = "timeout"
            step = steps[index] if index is not None and index >= 0 else {"kind": "prepare", "id": "prepare"}
            record = {"world": nproc, "kind": step["kind"], "id": step["id"], "status": why,
                      "error": f"{why} (step deadline {cfg['step_timeout']:.0f} s; stacks in {run_dir}): "
                               f"{str(e)[-1500:]}"}
            for key in ("decay", "backend", "method", "seq", "phase", "layout", "heads"):
                if key in step:
                    record[key] = step[key]
            if step["kind"] in ("check", "recheck"):
                record["pass"] = False
            failures.append(record)
            _emit(record, [rows_file] + ([cfg["partial"]] if cfg.get("partial") else []), round(time.time() - cfg["t0"], 1))
            print(f"W={nproc}: {why} at {step['id']}; stacks and progress per rank in {run_dir}", file=sys.stderr,
                  flush=True)
            if index is None or index < 0 or restarts >= cfg["max_restarts"]:
                break
            if step["kind"] == "sweep":
                dead.append(step["method"])  # a longer length would hang or die too
            start, restarts = index + 1, restarts + 1
    rows = _read_jsonl(rows_file)
    seen = {r.get("id") for r in rows}
    out = {"world": nproc, "restarts": restarts, "failures": failures, "debug_dir": str(run_dir),
           "check": [], "smoke": [], "sweep": [], "recheck": [], "hybrid": [], "not_run": []}
    kinds = {"check": "check", "recheck": "recheck", "smoke": "smoke", "sweep": "sweep", "hybrid": "hybrid",
             "hybrid-smoke": "smoke", "fla-cp": "sweep", "fla-cp-smoke": "smoke"}
    for r in rows:
        if r.get("kind") in kinds:
            out[kinds[r["kind"]]].append(r)
    out["not_run"] = [s["id"] for s in steps if s["id"] not in seen]
    return out


def _ints(text: str) -> list[int]:
    """``"64K,1M,300"`` -> ``[65536, 1048576, 300]``."""
    scale = {"K": 1024, "M": 1024 * 1024}
    return [int(x[:-1]) * scale[x[-1].upper()] if x[-1].upper() in scale else int(x)
            for x in (t.strip() for t in text.split(",")) if x]


def _arguments(p: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    p.add_argument("--phase", choices=["check", "bench", "all"], default="all",
                   help="check: every path once at a small size + smoke rows (GPU); bench: sweep, re-check, LASP-2H, "
                        "fla CP; all: check then bench")
    p.add_argument("--nprocs", default="4" if cuda else "2", help="comma-separated world sizes, run one after another")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    p.add_argument("--seqs", default=None, help="total sequence lengths (default GPU: 64K..2M, CPU: 256,512)")
    p.add_argument("--heads", type=int, default=None, help="default 16 (GPU), 2 (CPU)")
    p.add_argument("--head-dim", type=int, default=None, help="default 128 (GPU), 16 (CPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--decay", choices=["none", "gamma", "g"], default="g")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)} ('' for none)")
    p.add_argument("--backend", default=None, help="linear kernels: auto (default), fla, fla-only, torch")
    p.add_argument("--chunk-size", type=int, default=64, help="torch kernels' chunk size")
    p.add_argument("--dtype", default=None, help="default bfloat16 (GPU), float32 (CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="validate every path against the float64 reference (phase check/all)")
    p.add_argument("--recheck", action=argparse.BooleanOptionalAction, default=True,
                   help="after the sweep, check the fla paths again with the tuned configurations (GPU)")
    p.add_argument("--check-seq-local", type=int, default=None, help="tokens per rank in --check (default 320 / 12)")
    p.add_argument("--check-heads", type=int, default=None)
    p.add_argument("--smoke-seq", default="64K", help="total length of the smoke rows (phase check, GPU)")
    p.add_argument("--hybrid", action=argparse.BooleanOptionalAction, default=True,
                   help="time causal all-gather softmax per rank, contiguous vs zigzag")
    p.add_argument("--hybrid-seqs", default=None, help="default 32K,128K (GPU), 256 (CPU)")
    p.add_argument("--check-autotune", choices=["off", "limited", "full"], default="off",
                   help="Triton autotuning in check and smoke steps (off: one configuration, untimed)")
    p.add_argument("--autotune", choices=["off", "limited", "full"], default="limited",
                   help="Triton autotuning in the sweep (limited: at most 8 configurations per kernel and key)")
    p.add_argument("--step-timeout", type=float, default=None,
                   help="seconds one step may take before its rank dumps stacks and ends (default 90 GPU, 60 CPU)")
    p.add_argument("--prepare-timeout", type=float, default=None, help="seconds for the per-world preparation "
                   "(communicator + Triton self-checks; default 150 GPU, 60 CPU)")
    p.add_argument("--stack-every", type=float, default=30.0,
                   help="dump every rank's stacks every so many seconds while a step runs")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds for the whole run; later steps are recorded as not run "
                        "(default GPU: 140 check, 250 bench, 200 all; CPU 600); a step may overrun it by 20 s")
    p.add_argument("--max-restarts", type=int, default=3, help="fresh worlds after a timed-out or dead step")
    p.add_argument("--debug-dir", default=None,
                   help="per-rank progress, stacks and rows (default: a new temporary folder); e.g. $OUT/debug")
    p.add_argument("--debug-hang", default=None, help=argparse.SUPPRESS)  # "STEP_ID@RANK": that rank blocks there
    p.add_argument("--tiny", action="store_true", help="toy sizes (CPU end-to-end run)")
    p.add_argument("--partial", default=None, help="also append every row and event to this JSON-lines file at once")


@register("lasp2", "LASP-2 vs LASP-1 / ring K/V / compute limit for linear-attention SP, + checks and LASP-2H",
          _arguments)
def run(args: argparse.Namespace) -> dict:
    gpu = args.device == "cuda" and not args.tiny
    cuda = args.device == "cuda"
    limits = {"check": 140.0, "bench": 250.0, "all": 200.0} if cuda else dict.fromkeys(("check", "bench", "all"), 600.0)
    t0 = time.time()
    cfg = {
        "device": args.device,
        "phase": args.phase,
        "seqs": _ints(args.seqs) if args.seqs else ([2**k for k in range(16, 22)] if gpu else [256, 512]),
        "heads": args.heads or (16 if gpu else 2),
        "head_dim": args.head_dim or (128 if gpu else 16),
        "batch": args.batch,
        "decay": args.decay,
        "methods": [m for m in args.methods.split(",") if m],
        "backend": args.backend,
        "chunk_size": args.chunk_size if cuda else min(args.chunk_size, 16),
        "dtype": args.dtype or ("bfloat16" if cuda else "float32"),
        "warmup": args.warmup if not args.tiny else 1,
        "iters": args.iters if not args.tiny else 2,
        "check": args.check,
        "recheck": args.recheck,
        "check_seq_local": args.check_seq_local or (320 if cuda else 12),
        "check_heads": args.check_heads or (4 if cuda else 2),
        "smoke_seq": _ints(args.smoke_seq)[0] if gpu else 256,
        "hybrid": args.hybrid,
        "hybrid_seqs": _ints(args.hybrid_seqs) if args.hybrid_seqs else ([32768, 131072] if gpu else [256]),
        "check_autotune": args.check_autotune,
        "autotune": args.autotune,
        "step_timeout": args.step_timeout or (90.0 if cuda else 60.0),
        "prepare_timeout": args.prepare_timeout or (150.0 if cuda else 60.0),
        "stack_every": args.stack_every,
        "time_limit": args.time_limit or limits[args.phase],
        "max_restarts": args.max_restarts,
        "debug_hang": args.debug_hang,
        "partial": args.partial,
        "t0": t0,
    }
    cfg["deadline"] = t0 + cfg["time_limit"]
    unknown = set(cfg["methods"]) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    run_dir = Path(args.debug_dir) if args.debug_dir else Path(tempfile.mkdtemp(prefix="lasp2-debug-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    # Compiled kernels and autotune results on disk, shared by the check and bench commands on one machine.
    os.environ.setdefault("TRITON_CACHE_DIR", str(ROOT / "runs" / "triton-cache"))
    print(f"lasp2: phase {cfg['phase']}, time limit {cfg['time_limit']:.0f} s, step deadline "
          f"{cfg['step_timeout']:.0f} s; progress and stacks per rank in {run_dir}", flush=True)
    worlds = [_run_world(cfg, nproc, run_dir) for nproc in _ints(args.nprocs)]
    result = {"config": cfg, "worlds": worlds, "summary": summarize(worlds), "seconds": round(time.time() - t0, 1)}
    _print_summary(result)
    return result

# ----------------------------------------------------------------------------- summary and report


def summarize(worlds: list[dict]) -> list[dict]:
    """Per (world, seq): LASP-2's speed-up over each baseline and its fraction of the compute limit."""
    out = []
    for w in worlds:
        rows = [r for r in w.get("sweep", []) if r.get("phase") == "fwd+bwd" and "ms" in r]
        for seq in sorted({r["seq"] for r in rows}):
            t = {r["method"]: r["ms"] for r in rows if r["seq"] == seq}
            if "lasp2" not in t:
                continue
            entry = {"world": w["world"], "seq": seq, "lasp2_ms": t["lasp2"]}
            for base in ("lasp1", "lasp1-serial", "ring"):
                if base in t:
                    entry[f"speedup_vs_{base}"] = t[base] / t["lasp2"]
            if "local" in t:
                entry["fraction_of_compute_limit"] = t["local"] / t["lasp2"]
            if "lasp2-zigzag" in t:
                entry["zigzag_over_contiguous"] = t["lasp2-zigzag"] / t["lasp2"]
            if "lasp2-overlap" in t:
                entry["overlap_over_fold"] = t["lasp2-overlap"] / t["lasp2"]
            out.append(entry)
    return out


def _print_summary(result: dict) -> None:
    worlds = result["worlds"]
    for name in ("check", "recheck"):
        rows = [r for w in worlds for r in w.get(name, [])]
        if not rows:
            continue
        failed = [r for r in rows if r.get("pass") is False]
        judged = sum(1 for r in rows if r.get("pass") is not None)
        print(f"{name}: {judged - len(failed)}/{judged} paths pass" + (":" if failed else ""))
        for r in failed:
            print(f"  FAIL world {r['world']} {r.get('method')} backend={r.get('backend')} decay={r.get('decay')} "
                  f"[{r.get('status')}]: {r.get('error') or r.get('errors')}")
    smoke = [r for w in worlds for r in w.get("smoke", [])]
    if smoke:
        bad = [r for r in smoke if r.get("status") not in ("ok", "refused")]
        print(f"smoke: {len(smoke) - len(bad)}/{len(smoke)} ran" + "".join(
            f"\n  {r['id']} [{r.get('status')}]: {str(r.get('error'))[:200]}" for r in bad))
    for w in worlds:
        if w.get("failures"):
            print(f"W={w['world']}: {len(w['failures'])} step(s) timed out or died, {w['restarts']} restart(s): "
                  + ", ".join(f"{f['id']} ({f['status']})" for f in w["failures"]) + f"; stacks in {w['debug_dir']}")
        if w.get("not_run"):
            print(f"W={w['world']}: {len(w['not_run'])} step(s) not run (time limit or failures), first "
                  f"{w['not_run'][0]}")
    for s in result["summary"]:
        parts = [f"{k}={v:.3f}" for k, v in s.items() if isinstance(v, float)]
        print(f"W={s['world']} S={s['seq']}: " + " ".join(parts))
    print(f"lasp2: {result.get('seconds')} s")


def _tokens(n: int) -> str:
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _fmt(v, spec=".2f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def report(path: str | Path, md_out: str | Path | None = None, img_dir: str | Path | None = None) -> str:
    """docs/lasp2_results.md (tables) and docs/img/lasp2_*.png from a result file."""
    plt = pyplot()
    _, env, res = load_result(path)
    md_out, img_dir = report_paths("lasp2", md_out, img_dir)
    cfg = res["config"]
    lines = ["# LASP-2: benchmark results", "",
             f"Generated by `python -m benchmarks.lasp2 report {Path(path).name}` from `benchmarks/results/"
             f"{Path(path).name}`: **{env.get('device')}** x {env.get('gpu_count')}, torch {env.get('torch')}, "
             f"triton {env.get('triton')}, fla {env.get('fla')}, NCCL {env.get('nccl')}, commit "
             f"{str(env.get('git_commit'))[:10]}, {env.get('date_utc')}.", "",
             f"Model: causal linear attention, decay `{cfg['decay']}`, B={cfg['batch']}, H={cfg['heads']}, "
             f"D={cfg['head_dim']}, {cfg['dtype']}. Times: fwd+bwd, median of {cfg['iters']}, slowest rank. "
             "`local` = the same local kernel on the per-GPU length with no communication (compute limit).", ""]
    for w in res["worlds"]:
        if "error" in w:
            lines += [f"**{w['world']} ranks failed:** `{w['error'][:400]}`", ""]
            continue
        for name, title in (("check", "Correctness"), ("recheck", "Correctness with the sweep's tuned kernels")):
            checks = w.get(name, [])
            if not checks:
                continue
            bad = [c for c in checks if c.get("pass") is False]
            n_checked = sum(1 for c in checks if c.get("pass") is not None)
            tol = next((c["tol"] for c in checks if "tol" in c), CHECK_TOL)
            lines += [f"## {title}, {w['world']} ranks: {n_checked - len(bad)}/{n_checked} paths pass "
                      f"(max |error| / max |reference| < {tol} for o, dq, dk, dv, dg; float64 reference)", ""]
            if bad:
                lines += ["| method | backend | decay | status | error |", "|---|---|---|---|---|"]
                lines += [f"| {c.get('method')} | {c.get('backend')} | {c.get('decay')} | {c.get('status')} | "
                          f"{str(c.get('error'))[:200] if c.get('error') else {k: round(v, 4) for k, v in c.get('errors', {}).items()}} |"
                          for c in bad]
                lines.append("")
        if w.get("failures") or w.get("not_run"):
            lines += [f"Steps that timed out or died ({w['world']} ranks, a fresh world resumed after each): "
                      + (", ".join(f"`{f['id']}` ({f['status']})" for f in w.get("failures", [])) or "none")
                      + f"; steps not run: {len(w.get('not_run', []))}.", ""]
        sweep = [r for r in w.get("sweep", []) if r.get("phase", "fwd") in ("fwd+bwd", "fwd")]
        if not sweep:
            continue
        methods = [m for m in METHODS if any(r["method"] == m for r in sweep)]
        lines += [f"## {w['world']} ranks: fwd+bwd ms (peak GiB per GPU)", "",
                  "| total seq | per GPU | " + " | ".join(methods) + " | vs LASP-1 | vs LASP-1 serial | vs ring "
                  "| of compute limit |", "|---|---|" + "---|" * len(methods) + "---|---|---|---|"]
        summ = {s["seq"]: s for s in res["summary"] if s["world"] == w["world"]}
        for seq in sorted({r["seq"] for r in sweep}):
            cells = []
            for m in methods:
                r = next((r for r in sweep if r["seq"] == seq and r["method"] == m and r.get("phase") == "fwd+bwd"),
                         None)
                if r is None:
                    cells.append("–")
                elif "ms" in r:
                    cells.append(f"{r['ms']:.2f}" + (f" ({r['peak_gib']:.1f})" if "peak_gib" in r else ""))
                else:
                    cells.append("err" if "OutOfMemory" not in r.get("error", "") else "OOM")
            s = summ.get(seq, {})
            lines.append(f"| {_tokens(seq)} | {_tokens(seq // w['world'])} | " + " | ".join(cells)
                         + f" | {_fmt(s.get('speedup_vs_lasp1'))}x | {_fmt(s.get('speedup_vs_lasp1-serial'))}x | "
                           f"{_fmt(s.get('speedup_vs_ring'))}x | {_fmt(s.get('fraction_of_compute_limit'))} |")
        fwd = [r for r in w.get("sweep", []) if r["method"] in ("lasp2", "local", "fla-cp-gdn-fwd", "fla-gdn-local-fwd")
               and r.get("phase", "fwd") == "fwd" and "ms" in r]
        if fwd:
            lines += ["", "Forward only (fla's CP covers gated DeltaNet, not Simple GLA; its backward is refused "
                      "on Hopper with Triton 3.6, so the comparison is forward):", "",
                      "| total seq | LASP-2 / local (Simple GLA) | fla CP / fla local (gated DeltaNet) |", "|---|---|---|"]
            for seq in sorted({r["seq"] for r in fwd}):
                t = {r["method"]: r["ms"] for r in fwd if r["seq"] == seq}
                a = t["local"] / t["lasp2"] if "local" in t and "lasp2" in t else None
                b = (t["fla-gdn-local-fwd"] / t["fla-cp-gdn-fwd"]
                     if "fla-cp-gdn-fwd" in t and "fla-gdn-local-fwd" in t else None)
                lines.append(f"| {_tokens(seq)} | {_fmt(a)} | {_fmt(b)} |")
        lines.append("")
        hyb = [r for r in w.get("hybrid", []) if "fwd_ms_per_rank" in r]
        if hyb:
            lines += [f"### LASP-2H layout, {w['world']} ranks: causal all-gather softmax", "",
                      "| total seq | layout | pairs max/mean | fwd ms per rank | fwd max/mean | fwd+bwd ms (slowest) |",
                      "|---|---|---|---|---|---|"]
            for r in hyb:
                lines.append(f"| {_tokens(r['seq'])} | {r['layout']} | {r['pairs_imbalance']:.3f} | "
                             + ", ".join(f"{t:.2f}" for t in r["fwd_ms_per_rank"])
                             + f" | {r['fwd_imbalance']:.3f} | {_fmt(r.get('fwd_bwd_ms'))} |")
            lines.append("")
        # Plot: ratios vs sequence length.
        sel = [s for s in res["summary"] if s["world"] == w["world"]]
        if sel:
            fig, ax = plt.subplots(figsize=(6.5, 4))
            xs = [s["seq"] for s in sel]
            for key, label in (("speedup_vs_lasp1", "LASP-1 / LASP-2"), ("speedup_vs_lasp1-serial",
                               "LASP-1 (released order) / LASP-2"), ("speedup_vs_ring", "ring K/V / LASP-2"),
                               ("fraction_of_compute_limit", "compute limit / LASP-2")):
                ys = [s.get(key, float("nan")) for s in sel]
                if not all(math.isnan(y) for y in ys):
                    ax.plot(xs, ys, marker="o", label=label)
            for y, style, label in ((1.15, ":", "goal vs LASP-1"), (1.36, "--", "goal vs ring"),
                                    (0.95, "-.", "goal of compute limit")):
                ax.axhline(y, color="grey", lw=0.7, ls=style, label=f"{label} ({y})")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("total sequence (tokens)")
            ax.set_ylabel("time ratio")
            ax.set_title(f"LASP-2, {w['world']} x {env.get('device')}, decay {cfg['decay']}", fontsize=9)
            ax.legend(fontsize=7)
            png = img_dir / f"lasp2_{w['world']}x_{cfg['decay']}.png"
            save_figure(fig, png, dpi=110)
            lines += [f"![{w['world']} ranks](img/{png.name})", ""]
    return write_markdown(lines, md_out)


def _main(argv: list[str]) -> int:
    return report_main(argv, "lasp2", "markdown tables + plots from a result JSON", report)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
