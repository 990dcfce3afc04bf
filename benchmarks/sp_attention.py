"""Sequence-parallel softmax attention: Ulysses, ring and all-gather KV beside the peers.

For every total sequence length, every strategy runs forward + backward on its
shards of one ``[B, S, H, D]`` problem, in the same process group and the same run:

* ours: ``ulysses``, ``ring``, ``allgather`` (commflow.sp);
* ``deepspeed``: DeepSpeed's ``DistributedAttention`` around the same SDPA call,
  with ``batch_dim_idx=0`` for ``[b, s, h, d]`` and the local shape asserted;
* ``torch_cp_allgather`` / ``torch_cp_alltoall``: torch's ``context_parallel``
  with each rotate method (head-tail load balancing = our zigzag shards);
* ``sdpa_1gpu`` / ``sdpa_1gpu_bhsd``: plain SDPA on every GPU at the per-GPU shape
  ``(S, H/W)``, no communication: the compute limit of sequence parallelism, with
  inputs in ``[B, S, H, D]`` memory (the model layout every SP strategy here uses)
  and in ``[B, H, S, D]`` memory (the report takes the faster as the limit).

Before timing, each strategy is checked against the naive reference at
``--check-seq`` tokens (a wrong-but-fast peer is refused, not timed).

Communication: on CUDA every strategy (ours and the peers alike) runs on one
process group whose NCCL stream has high priority (``--nccl-priority high``): a
transfer queued beside a running attention kernel then gets SMs as soon as the
kernel's blocks retire, instead of after its last wave; ``name@normal`` runs a
strategy on the default (normal-priority) group for comparison. Variants
(``ulysses:8``, ``name@normal``, ...) are measured up to ``--variant-max-seq``.

Numbers per row: median fwd+bwd time (slowest rank), TFLOP/s per GPU and peak
memory per GPU (allocated and reserved, max over ranks). FLOP convention:
forward ``4 B S^2 H D`` (two matmuls), halved for causal, backward 2.5x the
forward, so fwd+bwd = ``3.5 x``; per GPU = total / W. Only the FLOPs the mask
needs are counted, so skipping masked blocks is no free speed-up.

``--max-seq`` adds the longest sequence each strategy trains: peak reserved memory
is linear in S for all of them (none materialises S x S scores), so a line fitted
through the measured lengths predicts the longest S under the memory cap
(``--mem-fraction`` of the GPU, also enforced with the allocator so OOM strikes every
rank alike); ``--max-seq-verify`` runs one fwd+bwd there, stepping down on OOM.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from pathlib import Path

import torch

from commflow.dist import init_distributed, spawn
from commflow.sp import shard
from commflow.sp.layout import LAYOUTS
from commflow.sp.reference import attention_reference

from .registry import register
from .sp_peers import ALL, OURS, Unavailable, build, is_variant, parse
from .timing import max_over_ranks, time_ms

CHECK_TOLERANCE = 3e-2  # max|err| / max|ref| of out, dq, dk, dv in bf16 (see tests/sp for the tight ones)
CUDA_DEFAULTS = {"seqs": "32768,65536,131072,262144,524288", "heads": 32, "head_dim": 128, "check_seq": 4096}
CPU_DEFAULTS = {"seqs": "128,256", "heads": 4, "head_dim": 16, "check_seq": 64}


def flops_fwd_bwd(batch: int, seq: int, heads: int, head_dim: int, causal: bool) -> float:
    """Total FLOPs of one attention forward + backward (see the module docstring)."""
    return 4.0 * batch * seq * seq * heads * head_dim * (0.5 if causal else 1.0) * 3.5


def _shapes(strategy, cfg, world, seq):
    b, h, hkv, d = cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    if strategy.layout == "heads":  # one GPU's share of the heads, whole sequence
        return (b, seq, h // world, d), (b, seq, max(1, hkv // world), d)
    return (b, seq // world, h, d), (b, seq // world, hkv, d)


def _leaf(x: torch.Tensor, head_major: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A leaf tensor holding ``x [B, S, H, D]`` and the ``[B, S, H, D]`` view a strategy gets."""
    if head_major:
        leaf = x.transpose(1, 2).contiguous().requires_grad_(True)
        return leaf, leaf.transpose(1, 2)
    leaf = x.contiguous().requires_grad_(True)
    return leaf, leaf


def _random_inputs(strategy, cfg, world, seq, device):
    """(leaves, forward arguments, dout) of random local inputs."""
    q_shape, kv_shape = _shapes(strategy, cfg, world, seq)
    dtype = getattr(torch, cfg["dtype"])
    pairs = [_leaf(torch.randn(s, device=device, dtype=dtype), strategy.head_major) for s in (q_shape, kv_shape, kv_shape)]
    return [p[0] for p in pairs], [p[1] for p in pairs], torch.randn(q_shape, device=device, dtype=dtype)


def _step(strategy, leaves, args, dout):
    for t in leaves:
        t.grad = None
    strategy.forward(*args).backward(dout)


def _agree(ok: bool) -> bool:
    """True only if every rank says True (a failed rank must not leave others waiting)."""
    return max_over_ranks(0.0 if ok else 1.0) == 0.0


def _free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _check(name, cfg, info, groups):
    """Out and grads of one strategy vs the naive reference at ``check_seq`` tokens."""
    seq, world, rank, dev = cfg["check_seq"], info.world_size, info.rank, info.device
    strategy = build(name, cfg, groups, world, dev, seq)
    gen = torch.Generator(device="cpu").manual_seed(7)
    b, h, hkv, d = cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    dtype = getattr(torch, cfg["dtype"])
    glob = {n: torch.randn(s, generator=gen).to(dev, dtype) for n, s in
            (("q", (b, seq, h, d)), ("k", (b, seq, hkv, d)), ("v", (b, seq, hkv, d)), ("do", (b, seq, h, d)))}
    ref_in = [glob[n].clone().requires_grad_(True) for n in "qkv"]
    ref = attention_reference(*ref_in, causal=cfg["causal"])
    ref_grads = torch.autograd.grad(ref, ref_in, glob["do"])
    if strategy.layout == "heads":
        hq_l, hkv_l = h // world, max(1, hkv // world)
        pick = lambda x, n: x[:, :, rank * n : (rank + 1) * n]
        local = lambda x, which: pick(x, hkv_l if which in "kv" else hq_l)
    else:
        local = lambda x, which: shard(x, layout=strategy.layout)
    pairs = [_leaf(local(glob[n], n).detach(), strategy.head_major) for n in "qkv"]
    with strategy.context():
        out = strategy.forward(*(p[1] for p in pairs))
        out.backward(local(glob["do"], "q").contiguous())
    grads = [p[0].grad.transpose(1, 2) if strategy.head_major else p[0].grad for p in pairs]
    errors = {}
    for tag, got, want, which in zip(("out", "dq", "dk", "dv"), [out, *grads], [ref, *ref_grads], "qqkv"):
        want = local(want, which).float()
        errors[tag] = ((got.float() - want).abs().max() / want.abs().max()).item()
    worst = max_over_ranks(max(errors.values()))
    return {"strategy": name, "seq": seq, "max_rel_error": worst, "ok": worst <= CHECK_TOLERANCE, **errors}


def _iters(cfg, seq) -> int:
    return cfg["long_iters"] if cfg["long_iters"] and seq >= cfg["long_seq"] else cfg["iters"]


def _measure(name, cfg, info, seq, groups):
    world, dev = info.world_size, info.device
    cuda = dev.type == "cuda"
    row = {"strategy": name, "seq": seq, "world": world}
    strategy = build(name, cfg, groups, world, dev, seq)
    _free(dev)
    status = "ok"
    try:
        leaves, args, dout = _random_inputs(strategy, cfg, world, seq, dev)
        inputs_gib = torch.cuda.memory_allocated(dev) / 2**30 if cuda else None
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        with strategy.context():
            t = time_ms(lambda: _step(strategy, leaves, args, dout), warmup=cfg["warmup"], iters=_iters(cfg, seq),
                        device=dev, barrier=True)
    except torch.OutOfMemoryError:
        status = "oom"
    leaves = args = dout = None
    ok = _agree(status == "ok")
    if not ok:
        _free(dev)
        row["status"] = "oom"
        return row
    ms = max_over_ranks(t["median_ms"])
    row.update(status="ok", time_ms=ms, min_ms=max_over_ranks(t["min_ms"]), iters=t["iters"],
               tflops_per_gpu=flops_fwd_bwd(cfg["batch"], seq, cfg["heads"], cfg["head_dim"], cfg["causal"])
               / world / (ms * 1e-3) / 1e12)
    if cuda:
        row.update(inputs_gib=max_over_ranks(inputs_gib),
                   peak_allocated_gib=max_over_ranks(torch.cuda.max_memory_allocated(dev) / 2**30),
                   peak_reserved_gib=max_over_ranks(torch.cuda.max_memory_reserved(dev) / 2**30))
    _free(dev)
    return row


def combine_rounds(rows: list[dict]) -> dict:
    """One row per strategy and length from ``--rounds`` interleaved measurements: the
    median over rounds of each round's median time (``round_ms`` keeps them all), the
    fastest sample, the largest peak memory. A single round is returned unchanged; a
    strategy out of memory in any round is out of memory."""
    if len(rows) == 1:
        return rows[0]
    if any(r["status"] != "ok" for r in rows):
        return next(r for r in rows if r["status"] != "ok")
    out = dict(rows[0])
    per_round = [r["time_ms"] for r in rows]
    ms = statistics.median(per_round)
    out.update(time_ms=ms, min_ms=min(r["min_ms"] for r in rows), iters=sum(r["iters"] for r in rows),
               rounds=len(rows), round_ms=per_round,
               tflops_per_gpu=rows[0]["tflops_per_gpu"] * rows[0]["time_ms"] / ms)
    for key in ("inputs_gib", "peak_allocated_gib", "peak_reserved_gib"):
        if key in out:
            out[key] = max(r[key] for r in rows)
    return out


def _try_step(name, cfg, info, seq, groups) -> bool:
    """One fwd+bwd at ``seq`` tokens; False on OOM (on any rank)."""
    dev = info.device
    strategy = build(name, cfg, groups, info.world_size, dev, seq)
    _free(dev)
    ok = True
    try:
        leaves, args, dout = _random_inputs(strategy, cfg, info.world_size, seq, dev)
        with strategy.context():
            _step(strategy, leaves, args, dout)
        torch.cuda.synchronize(dev)
    except torch.OutOfMemoryError:
        ok = False
    leaves = args = dout = None
    _free(dev)
    return _agree(ok)


def _max_seq(name, cfg, info, rows, say, groups):
    import numpy as np

    pts = [(r["seq"], r["peak_reserved_gib"]) for r in rows if r["strategy"] == name and r.get("status") == "ok"]
    rec = {"strategy": name}
    if len(pts) < 2:
        return {**rec, "status": "needs >= 2 measured lengths to fit memory(S)"}
    slope, intercept = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)
    cap = cfg["mem_fraction"] * torch.cuda.get_device_properties(info.device).total_memory / 2**30
    gran = cfg["max_seq_granularity"]
    predicted = int((cap - intercept) / slope) // gran * gran if slope > 0 else None
    rec.update(status="predicted", cap_gib=cap, gib_per_token=slope, gib_fixed=intercept, predicted_seq=predicted)
    if cfg["max_seq_verify"] and predicted:
        tflops = max(r["tflops_per_gpu"] for r in rows if r["strategy"] == name and r.get("status") == "ok")
        seq = predicted
        for _ in range(4):
            est = flops_fwd_bwd(cfg["batch"], seq, cfg["heads"], cfg["head_dim"], cfg["causal"]) / info.world_size / (tflops * 1e12)
            say(f"max-seq {name}: trying {seq} tokens (~{est:.0f} s)")
            if _try_step(name, cfg, info, seq, groups):
                rec.update(status="verified", verified_seq=seq)
                break
            rec.setdefault("oom_at", []).append(seq)
            seq -= gran
    return rec


def _groups(cfg: dict, device) -> dict:
    """``{"high": group, "normal": None}``: the group every strategy communicates over
    (NCCL with a high-priority stream on CUDA unless ``--nccl-priority normal``) and the
    default group for ``name@normal``."""
    if torch.device(device).type != "cuda" or cfg["nccl_priority"] == "normal":
        return {"high": None, "normal": None}
    import torch.distributed as dist

    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = True
    return {"high": dist.new_group(backend="nccl", pg_options=options), "normal": None}


def _worker(cfg: dict) -> dict:
    info = init_distributed(device=cfg["device"])
    dev = info.device
    say = (lambda msg: print(msg, flush=True)) if info.rank == 0 else (lambda msg: None)
    progress = Path(cfg["progress"]) if cfg["progress"] and info.rank == 0 else None

    def record(kind, item):
        if progress:
            with progress.open("a") as f:
                f.write(json.dumps({"kind": kind, **item}) + "\n")

    if dev.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(cfg["mem_fraction"], dev)
    groups = _groups(cfg, dev)
    torch.manual_seed(1000 + info.rank)
    out = {"checks": [], "rows": [], "skipped": {}, "max_seq": []}
    usable = []
    for name in cfg["strategies"]:
        try:
            build(name, cfg, groups, info.world_size, dev, cfg["check_seq"] or 2 * info.world_size)
        except Unavailable as e:
            out["skipped"][name] = str(e)
            say(f"skip {name}: {e}")
            continue
        if cfg["check_seq"]:
            try:  # a peer that raises (same error on every rank: an API it lacks) is reported, not fatal
                check = _check(name, cfg, info, groups)
            except Exception as e:  # noqa: BLE001
                check = {"strategy": name, "seq": cfg["check_seq"], "ok": False, "max_rel_error": float("nan"),
                         "error": f"{type(e).__name__}: {e}"[:500]}
            out["checks"].append(check)
            record("check", check)
            say(f"check {name:>20}: max rel error {check['max_rel_error']:.2e} {'ok' if check['ok'] else 'FAILED'}")
            if not check["ok"]:
                why = check.get("error") or f"{check['max_rel_error']:.3g} > {CHECK_TOLERANCE}"
                out["skipped"][name] = f"failed the correctness check ({why})"
                _free(dev)
                continue
        usable.append(name)
        _free(dev)
    for seq in cfg["seqs"]:
        names = [n for n in usable if not (is_variant(n) and seq > cfg["variant_max_seq"])]
        per_round: dict[str, list[dict]] = {n: [] for n in names}
        spent = dict.fromkeys(names, 0.0)
        for r in range(cfg["rounds"]):
            # Interleaved: every round measures every strategy once, in an order shuffled per
            # round (the same on every rank), so clock and thermal drift hit all of them alike.
            order = list(names)
            if r:
                random.Random(r).shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                per_round[name].append(_measure(name, cfg, info, seq, groups))
                spent[name] += time.perf_counter() - t0
                if cfg["rounds"] > 1:
                    record("round", {**per_round[name][-1], "round": r})  # kept if the run dies later
        for name in names:
            row = combine_rounds(per_round[name])
            out["rows"].append(row)
            record("row", row)
            if row["status"] == "ok":
                mem = f"  peak {row['peak_allocated_gib']:6.2f} GiB" if "peak_allocated_gib" in row else ""
                say(f"{seq:>8} {name:>20}: {row['time_ms']:10.2f} ms  {row['tflops_per_gpu']:8.2f} TFLOP/s/GPU"
                    f"{mem}  ({spent[name]:.0f} s)")
            else:
                say(f"{seq:>8} {name:>20}: {row['status']}")
    if cfg["max_seq"]:
        if dev.type != "cuda":
            out["max_seq_skipped"] = "needs CUDA memory accounting"
        else:
            for name in [n for n in cfg["max_seq_strategies"] if n in usable]:
                rec = _max_seq(name, cfg, info, out["rows"], say, groups)
                out["max_seq"].append(rec)
                record("max_seq", rec)
                say(f"max-seq {name}: {rec}")
    return out


def _arguments(p: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: all GPUs; 2 on CPU)")
    p.add_argument("--seqs", default=None, help=f"total sequence lengths (default {CUDA_DEFAULTS['seqs']} on "
                   f"CUDA, {CPU_DEFAULTS['seqs']} on CPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None, help="query heads (default 32 on CUDA, 4 on CPU)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--head-dim", type=int, default=None, help="default 128 on CUDA, 16 on CPU")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--no-causal", action="store_true", help="full (bidirectional) attention")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="shards of ring/allgather (default: zigzag if causal, else contiguous)")
    p.add_argument("--strategies", default=",".join(ALL),
                   help=f"comma-separated subset of {','.join(ALL)}; ulysses:N / allgather:N pin head_chunks=N, "
                   "torch_cp_*:KERNEL and sdpa_1gpu:KERNEL pin the SDPA kernel (flash, cudnn, efficient, default), "
                   "NAME@normal runs on the normal-priority default group")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every strategy this many times per length, interleaved in a shuffled order per "
                        "round; rows report the median over rounds and keep each round's time (round_ms)")
    p.add_argument("--long-iters", type=int, default=None, help="timed iterations from --long-seq up (default: --iters)")
    p.add_argument("--long-seq", type=int, default=262144)
    p.add_argument("--variant-max-seq", type=int, default=131072,
                   help="longest sequence at which variants (names with ':' or '@') are measured")
    p.add_argument("--nccl-priority", choices=["high", "normal"], default="high",
                   help="NCCL stream priority of the group every strategy communicates over (CUDA)")
    p.add_argument("--ulysses-chunks", type=int, default=1, help="head_chunks of ulysses (default 1, the function's)")
    p.add_argument("--allgather-chunks", type=int, default=1, help="head_chunks of allgather (default 1, the function's)")
    p.add_argument("--check-seq", type=int, default=None, help="tokens of the correctness check (0: skip)")
    p.add_argument("--mem-fraction", type=float, default=0.95, help="allocator cap per GPU (fraction of memory)")
    p.add_argument("--max-seq", action="store_true", help="predict the longest trainable sequence per strategy")
    p.add_argument("--max-seq-verify", action="store_true", help="run one fwd+bwd at the predicted length")
    p.add_argument("--max-seq-strategies", default=",".join(s for s in ALL if not s.startswith("sdpa_1gpu")))
    p.add_argument("--max-seq-granularity", type=int, default=65536)
    p.add_argument("--progress", default=None, help="append every check/row as JSON Lines to this file (rank 0)")


def _config(args: argparse.Namespace) -> dict:
    defaults = CUDA_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    heads = args.heads or defaults["heads"]
    causal = not args.no_causal
    strategies = [s for s in args.strategies.split(",") if s]
    for name in strategies:
        try:
            parse(name)
        except ValueError as e:
            raise SystemExit(f"--strategies: {e}") from None
    nproc = args.nproc or (min(torch.cuda.device_count(), 8) if args.device == "cuda" else 2)
    seqs = [int(s) for s in (args.seqs or defaults["seqs"]).split(",")]
    for s in seqs:
        if s % (2 * nproc):
            raise SystemExit(f"--seqs: {s} is not divisible by 2 x nproc ({2 * nproc})")
    if args.rounds < 1:
        raise SystemExit(f"--rounds: must be at least 1, got {args.rounds}")
    return {
        "device": args.device, "nproc": nproc, "seqs": seqs, "batch": args.batch, "heads": heads,
        "kv_heads": args.kv_heads or heads, "head_dim": args.head_dim or defaults["head_dim"],
        "dtype": args.dtype, "causal": causal, "layout": args.layout or ("zigzag" if causal else "contiguous"),
        "strategies": strategies, "warmup": args.warmup, "iters": args.iters, "long_iters": args.long_iters,
        "rounds": args.rounds,
        "long_seq": args.long_seq, "variant_max_seq": args.variant_max_seq, "nccl_priority": args.nccl_priority,
        "ulysses_chunks": args.ulysses_chunks, "allgather_chunks": args.allgather_chunks,
        "check_seq": defaults["check_seq"] if args.check_seq is None else args.check_seq,
        "mem_fraction": args.mem_fraction, "max_seq": args.max_seq, "max_seq_verify": args.max_seq_verify,
        "max_seq_strategies": args.max_seq_strategies.split(","), "max_seq_granularity": args.max_seq_granularity,
        "progress": args.progress, "ours": list(OURS),
    }


@register("sp_attention", "SP softmax attention (Ulysses, ring, all-gather) vs DeepSpeed, torch CP, 1-GPU SDPA",
          _arguments)
def run(args: argparse.Namespace) -> dict:
    cfg = _config(args)
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}  # never NVLink multicast
    result = spawn(_worker, cfg["nproc"], cfg, backend=None, init=False, timeout_s=3600, env=env)[0]
    return {"config": cfg, "flop_convention": "fwd 4*B*S^2*H*D (x0.5 causal); fwd+bwd = 3.5 x fwd; per GPU = /W",
            **result}
