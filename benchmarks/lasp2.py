"""LASP-2 against LASP-1, ring K/V passing and the compute limit, for causal linear attention.

One run does three things per world size (``--nprocs``), in one process group:

1. ``--check`` (default on): every path (LASP-2 with the fold and in the paper's overlapped
   order, zigzag, both LASP-1 orders, ring K/V, the local kernel, fla's own
   ``chunk_simple_gla``) with every kernel backend (``fla`` = fla kernels + commflow's
   Triton kernels, ``fla-only`` = fla + the torch formulation, ``torch``)
   and every decay mode, forward and gradients against the float64 reference on the same
   (rounded) inputs; rows say pass/fail. Timings of a path that failed are flagged.
2. The sweep: fwd+bwd time (median over ``--iters``, slowest rank) and peak memory per GPU
   of each method at each total sequence length; ``local`` is the local kernel alone at the
   per-GPU length on every GPU (no communication): the compute limit. ``fla-cp-gdn`` is
   fla's own context parallelism, which covers the delta-rule family only (gated DeltaNet
   here, forward only: its backward is refused on Hopper with Triton 3.6), next to
   ``fla-gdn-local`` at the per-GPU length.
3. ``--hybrid`` (LASP-2H): causal ``allgather_attention`` per rank under the contiguous and
   zigzag layouts (forward time per rank, fwd+bwd slowest rank) beside the count of causal
   (query, key) pairs per rank.

``python -m benchmarks lasp2 --device cpu --nprocs 2 --tiny`` runs everything end to end on
CPU at toy sizes. ``python -m benchmarks.lasp2 report RESULT.json`` writes docs/lasp2_results.md
and docs/img/lasp2_*.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from commflow.dist import init_distributed, spawn

from .registry import register
from .timing import max_over_ranks, peak_memory_gib, time_ms

METHODS = ("lasp2", "lasp2-overlap", "lasp2-zigzag", "lasp1", "lasp1-serial", "ring", "local", "fla-local", "fla-cp-gdn")
CHECK_TOL = 3e-2  # bf16 inputs, bf16 tiles: max |err| / max |reference| per tensor
CPU_CHECK_TOL = 1e-4  # float32 on CPU


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


def _step(fn, leaves, g_gamma, do, backward=True):
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


# ----------------------------------------------------------------------------- check


def _rel(mine, ref) -> float:
    return ((mine.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def _check(cfg, info) -> list[dict]:
    """Every path vs the float64 reference on the same inputs (rounded to the run dtype)."""
    from commflow.sp import shard
    from commflow.sp.linear_kernels import select_kernels
    from commflow.sp.linear_reference import linear_attention_naive

    world, dev = info.world_size, info.device
    B, H, D = 2, cfg["check_heads"], cfg["head_dim"]
    s_local = cfg["check_seq_local"]
    dtype = getattr(torch, cfg["dtype"])
    tol = CHECK_TOL if dev.type == "cuda" else CPU_CHECK_TOL
    backends = ["fla", "fla-only", "torch"] if dev.type == "cuda" else ["torch"]
    rows = []
    for decay in ("none", "gamma", "g"):
        leaves, g_gamma, do = _inputs(B, s_local * world, H, D, decay, dtype, dev, seed=123, requires_grad=False)
        ref_leaves = [t.double().requires_grad_() for t in leaves]
        o_ref, _ = linear_attention_naive(*ref_leaves[:3], g=ref_leaves[3] if decay == "g" else None,
                                          g_gamma=None if g_gamma is None else g_gamma.double())
        ref = [o_ref.detach(), *torch.autograd.grad(o_ref, ref_leaves, do.double())]
        for backend in backends:
            kernels = select_kernels(dev, backend=backend, chunk_size=cfg["chunk_size"] if backend == "torch" else None)
            for method in ("lasp2", "lasp2-overlap", "lasp2-zigzag", "lasp1", "lasp1-serial", "ring", "local",
                           "fla-local"):
                if method == "fla-local" and (backend != "fla" or dev.type != "cuda"):
                    continue
                layout = "zigzag" if method == "lasp2-zigzag" else "contiguous"
                glob = method in ("local", "fla-local")  # one GPU runs the whole sequence
                row = {"world": world, "decay": decay, "backend": backend, "method": method}
                try:
                    mine = [t.detach().clone() if glob else shard(t.detach(), layout=layout) for t in leaves]
                    mine = [t.requires_grad_() for t in mine]
                    d_o = do if glob else shard(do, layout=layout)
                    fn = _linear_method(method, kernels)
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
                rows.append(row)
    if dev.type == "cuda":  # the commflow Triton kernel variants that ran, and their self-checks
        from commflow.sp import linear_triton

        for (_, _, K, V, C, mode, fold), (ok, worst) in linear_triton.verdicts().items():
            rows.append({"world": world, "method": f"triton-self-check K={K} V={V} C={C} fold={fold}",
                         "backend": "fla", "decay": mode, "errors": {"rel": worst}, "pass": ok})
    return rows


# ----------------------------------------------------------------------------- sweep


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


def _sweep(cfg, info, log) -> list[dict]:
    from commflow.sp.linear_kernels import select_kernels

    world, dev = info.world_size, info.device
    dtype = getattr(torch, cfg["dtype"])
    kernels = select_kernels(dev, backend=cfg["backend"], chunk_size=cfg["chunk_size"])
    rows, dead = [], set()
    for seq in cfg["seqs"]:
        if seq % (2 * world):
            continue
        s_local = seq // world
        leaves, g_gamma, do = _inputs(cfg["batch"], s_local, cfg["heads"], cfg["head_dim"], cfg["decay"], dtype, dev,
                                      seed=1)
        for method in cfg["methods"]:
            if method in dead:
                continue
            base = {"world": world, "seq": seq, "seq_local": s_local, "method": method, "decay": cfg["decay"],
                    "heads": cfg["heads"], "head_dim": cfg["head_dim"], "batch": cfg["batch"],
                    "backend": kernels.name}
            if method == "fla-cp-gdn":
                for name, cp in (("fla-cp-gdn-fwd", world > 1), ("fla-gdn-local-fwd", False)):
                    row = dict(base, method=name, phase="fwd")
                    try:
                        run = _fla_gdn(cfg, info, s_local, cp)
                        err = None
                    except Exception as e:  # noqa: BLE001 - fla missing / API mismatch: a row, not a crash
                        run, err = None, f"{type(e).__name__}: {str(e)[:300]}"
                    if _all_ok(err is None, dev):
                        timing, err = _timed(run, dev, cfg["warmup"], cfg["iters"])
                        row.update(timing)
                    if err:
                        row["error"] = err
                    rows.append(row)
                    log(row)
                continue
            if method.startswith("fla") and dev.type != "cuda":
                continue
            fn = _linear_method(method, kernels)
            # Forward alone only where the fla CP comparison needs it.
            for bwd in (True, False) if method in ("lasp2", "local") else (True,):
                row = dict(base, phase="fwd+bwd" if bwd else "fwd")
                timing, err = _timed(_step(fn, leaves, g_gamma, do, backward=bwd), dev, cfg["warmup"], cfg["iters"])
                row.update(timing)
                if err:
                    row["error"] = err
                    if "OutOfMemory" in err and bwd:
                        dead.add(method)
                rows.append(row)
                log(row)
                if err:
                    break
        del leaves, do
    return rows


def _hybrid(cfg, info, log) -> list[dict]:
    """Causal softmax (all-gather K/V) per rank under both layouts: LASP-2H's layout cost."""
    from commflow.sp import allgather_attention
    from commflow.sp.hybrid import load_imbalance, softmax_pairs_per_rank

    world, dev = info.world_size, info.device
    dtype = getattr(torch, cfg["dtype"])
    rows = []
    for seq in cfg["hybrid_seqs"]:
        if seq % (2 * world):
            continue
        s_local = seq // world
        leaves, _, do = _inputs(cfg["batch"], s_local, cfg["heads"], cfg["head_dim"], "none", dtype, dev, seed=3)
        for layout in ("contiguous", "zigzag"):
            def fn(q, k, v, g, gg, layout=layout):
                return allgather_attention(q, k, v, causal=True, layout=layout)

            row = {"world": world, "seq": seq, "layout": layout, "heads": cfg["heads"], "head_dim": cfg["head_dim"]}
            pairs = softmax_pairs_per_rank(seq, world, layout)
            row["pairs_imbalance"] = load_imbalance(pairs)
            try:
                fwd = time_ms(_step(fn, leaves, None, do, backward=False), warmup=cfg["warmup"], iters=cfg["iters"],
                              device=dev, barrier=True)["median_ms"]
                per_rank = [None] * world
                dist.all_gather_object(per_rank, fwd)
                row["fwd_ms_per_rank"] = per_rank
                row["fwd_imbalance"] = load_imbalance(per_rank)
                both, err = _timed(_step(fn, leaves, None, do), dev, cfg["warmup"], cfg["iters"])
                row.update({"fwd_bwd_" + key: val for key, val in both.items()})
                if err:
                    row["error"] = err
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            log(row)
    return rows


def _worker(cfg: dict) -> dict:
    info = init_distributed(device=cfg["device"])
    partial = Path(cfg["partial"]) if cfg.get("partial") else None

    def log(row):
        if info.rank == 0:
            print(json.dumps(row, default=str), flush=True)
            if partial is not None:
                with partial.open("a") as f:
                    f.write(json.dumps(row, default=str) + "\n")

    out = {"world": info.world_size, "check": [], "sweep": [], "hybrid": []}
    t0 = time.time()
    if cfg["check"]:
        out["check"] = _check(cfg, info)
        for row in out["check"]:
            log(row)
    if cfg["methods"]:
        out["sweep"] = _sweep(cfg, info, log)
    if cfg["hybrid"] and info.world_size > 1:
        out["hybrid"] = _hybrid(cfg, info, log)
    out["seconds"] = time.time() - t0
    return out


# ----------------------------------------------------------------------------- runner


def _ints(text: str) -> list[int]:
    """``"64K,1M,300"`` -> ``[65536, 1048576, 300]``."""
    scale = {"K": 1024, "M": 1024 * 1024}
    return [int(x[:-1]) * scale[x[-1].upper()] if x[-1].upper() in scale else int(x)
            for x in (t.strip() for t in text.split(",")) if x]


def _arguments(p: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
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
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="validate every path against the float64 reference first")
    p.add_argument("--check-seq-local", type=int, default=None, help="tokens per rank in --check (default 320 / 12)")
    p.add_argument("--check-heads", type=int, default=None)
    p.add_argument("--hybrid", action=argparse.BooleanOptionalAction, default=True,
                   help="time causal all-gather softmax per rank, contiguous vs zigzag")
    p.add_argument("--hybrid-seqs", default=None, help="default 32K,128K (GPU), 256 (CPU)")
    p.add_argument("--tiny", action="store_true", help="toy sizes (CPU end-to-end run)")
    p.add_argument("--partial", default=None, help="also append every row to this JSON-lines file as it completes")


@register("lasp2", "LASP-2 vs LASP-1 / ring K/V / compute limit for linear-attention SP, + checks and LASP-2H",
          _arguments)
def run(args: argparse.Namespace) -> dict:
    gpu = args.device == "cuda" and not args.tiny
    cfg = {
        "device": args.device,
        "seqs": _ints(args.seqs) if args.seqs else ([2**k for k in range(16, 22)] if gpu else [256, 512]),
        "heads": args.heads or (16 if gpu else 2),
        "head_dim": args.head_dim or (128 if gpu else 16),
        "batch": args.batch,
        "decay": args.decay,
        "methods": [m for m in args.methods.split(",") if m],
        "backend": args.backend,
        "chunk_size": args.chunk_size if args.device == "cuda" else min(args.chunk_size, 16),
        "dtype": args.dtype or ("bfloat16" if args.device == "cuda" else "float32"),
        "warmup": args.warmup if not args.tiny else 1,
        "iters": args.iters if not args.tiny else 2,
        "check": args.check,
        "check_seq_local": args.check_seq_local or (320 if args.device == "cuda" else 12),
        "check_heads": args.check_heads or (4 if args.device == "cuda" else 2),
        "hybrid": args.hybrid,
        "hybrid_seqs": _ints(args.hybrid_seqs) if args.hybrid_seqs else ([32768, 131072] if gpu else [256]),
        "partial": args.partial,
    }
    unknown = set(cfg["methods"]) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    worlds = []
    for nproc in _ints(args.nprocs):
        try:
            worlds.append(spawn(_worker, nproc, cfg, backend=None, init=False, timeout_s=3600)[0])
        except Exception as e:  # noqa: BLE001 - keep the other world sizes' numbers
            worlds.append({"world": nproc, "error": f"{type(e).__name__}: {str(e)[-2000:]}"})
            print(f"world {nproc} failed: {e}", file=sys.stderr)
    result = {"config": cfg, "worlds": worlds, "summary": summarize(worlds)}
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
    failed = [r for w in result["worlds"] for r in w.get("check", []) if r.get("pass") is False]
    checked = sum(1 for w in result["worlds"] for r in w.get("check", []) if r.get("pass") is not None)
    print(f"check: {checked - len(failed)}/{checked} paths pass" + (":" if failed else ""))
    for r in failed:
        print(f"  FAIL world {r['world']} {r['method']} backend={r['backend']} decay={r['decay']}: "
              f"{r.get('error') or r.get('errors')}")
    for s in result["summary"]:
        parts = [f"{k}={v:.3f}" for k, v in s.items() if isinstance(v, float)]
        print(f"W={s['world']} S={s['seq']}: " + " ".join(parts))


def _tokens(n: int) -> str:
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _fmt(v, spec=".2f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def report(path: str | Path, md_out: str | Path | None = None, img_dir: str | Path | None = None) -> str:
    """docs/lasp2_results.md (tables) and docs/img/lasp2_*.png from a result file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = json.loads(Path(path).read_text())
    env, res = record.get("env", {}), record["results"]
    root = Path(__file__).resolve().parent.parent
    md_out = Path(md_out) if md_out else root / "docs" / "lasp2_results.md"
    img_dir = Path(img_dir) if img_dir else root / "docs" / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
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
        checks = w.get("check", [])
        if checks:
            bad = [c for c in checks if c.get("pass") is False]
            n_checked = sum(1 for c in checks if c.get("pass") is not None)
            tol = next((c["tol"] for c in checks if "tol" in c), CHECK_TOL)
            lines += [f"## Correctness, {w['world']} ranks: {n_checked - len(bad)}/{n_checked} paths pass "
                      f"(max |error| / max |reference| < {tol} for o, dq, dk, dv, dg; float64 reference)", ""]
            if bad:
                lines += ["| method | backend | decay | error |", "|---|---|---|---|"]
                lines += [f"| {c['method']} | {c['backend']} | {c['decay']} | "
                          f"{c.get('error') or {k: round(v, 4) for k, v in c.get('errors', {}).items()}} |" for c in bad]
                lines.append("")
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
            fig.tight_layout()
            png = img_dir / f"lasp2_{w['world']}x_{cfg['decay']}.png"
            fig.savefig(png, dpi=110)
            plt.close(fig)
            lines += [f"![{w['world']} ranks](img/{png.name})", ""]
    text = "\n".join(lines) + "\n"
    md_out.write_text(text)
    return text


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lasp2")
    sub = p.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("report", help="markdown tables + plots from a result JSON")
    rp.add_argument("json")
    rp.add_argument("--md", default=None)
    rp.add_argument("--img-dir", default=None)
    a = p.parse_args(argv)
    report(a.json, a.md, a.img_dir)
    print(f"wrote {a.md or 'docs/lasp2_results.md'} and lasp2_*.png")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
