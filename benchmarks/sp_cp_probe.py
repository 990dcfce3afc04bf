"""What torch's ``context_parallel`` runs inside its context, and whether it is right.

A diagnosis, not a timing: ``sp_attention``'s torch CP peer fails its correctness
check on torch 2.11 / 4 H100 with the same error for every SDPA kernel (flash,
cuDNN, SDPA's own choice), while the same sharding passes against torch 2.13's CP
code. For each of three set-ups this records, per rank, whether
``F.scaled_dot_product_attention`` is patched inside the context, which aten
attention and collective ops run (and on DTensors or plain tensors), and the
error of the output and the gradients against plain single-GPU SDPA:

``torch_test``  torch's own test recipe: global ``[B, H, S, D]`` q, k, v, dO given to
                ``context_parallel(buffers=...)`` to shard, results gathered back with
                ``context_parallel_unshard``;
``bench_bshd``  ``sp_attention``'s recipe: our zigzag shards of ``[B, S, H, D]``
                tensors, SDPA on their ``[B, H, S, D]`` views, a length-only marker
                buffer;
``bench_bhsd``  the same with ``[B, H, S, D]``-contiguous shards.

    python -m benchmarks sp_cp_probe --nproc 4            # CUDA only; ~1 minute
"""

from __future__ import annotations

import argparse
import contextlib
import inspect

import torch

from commflow.dist import init_distributed, spawn
from commflow.sp import shard

from .registry import register

__all__ = ["run"]


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the attention and communication ops that run (and whether on DTensors)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = str(func)
        if any(key in name for key in ("attention", "sdp", "bmm", "c10d", "all_gather", "all_to_all")):
            from torch.distributed.tensor import DTensor

            on_dtensor = any(isinstance(a, DTensor) for a in (*args, *(kwargs or {}).values()))
            choice = f" -> {result}" if "_fused_sdp_choice" in name else ""
            self.ops.append(f"{name}{' [DTensor]' if on_dtensor else ''}{choice}")
        return result


def _summary(ops: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    return counts


def _errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict[str, float]:
    return {name: ((g.float() - w.float()).abs().max() / w.float().abs().max()).item()
            for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}


def _worker(cfg: dict) -> dict:
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    try:
        from torch.distributed.tensor.experimental import _context_parallel as cp_pkg
        from torch.distributed.tensor.experimental._context_parallel import _attention as cp_attention
    except ImportError:
        cp_pkg = None
        from torch.distributed.tensor.experimental import _attention as cp_attention
    from torch.distributed.tensor.experimental import _attention as legacy

    info = init_distributed(device=cfg.get("device", "cuda"))
    dev, world = info.device, info.world_size
    mesh = init_device_mesh(dev.type, (world,))
    report = {
        "torch": torch.__version__,
        "context_parallel_file": inspect.getsourcefile(context_parallel),
        "cp_package": getattr(cp_pkg, "__file__", None),
        "one_options_object": legacy._cp_options is cp_attention._cp_options,
        "default_sdpa_choice": None,
        "setups": {},
    }
    b, h, d, seq = 1, cfg["heads"], cfg["head_dim"], cfg["seq"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn(b, h, seq, d, generator=gen).to(dev, torch.bfloat16) for _ in range(4))
    ref_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=True)
    ref_grads = torch.autograd.grad(ref, ref_in, do)
    want_global = [ref.detach(), *ref_grads]
    probe = q.detach().requires_grad_(True)
    report["default_sdpa_choice"] = int(torch._fused_sdp_choice(probe, probe, probe, None, 0.0, True))
    original_sdpa = F.scaled_dot_product_attention

    def guarded(fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - the probe reports whatever a recipe raises
            return {"error": f"{type(e).__name__}: {e}"[:800]}

    def torch_test():
        cq, ck, cv, cdo = (t.clone() for t in (q, k, v, do))
        log = _OpLog()
        bufs = [cq, ck, cv, cdo]
        with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2, 2], no_restore_buffers=set(bufs)):
            patched = F.scaled_dot_product_attention is not original_sdpa
            for t in (cq, ck, cv):
                t.requires_grad_(True)
            with log:
                out = F.scaled_dot_product_attention(cq, ck, cv, is_causal=True)
                out.backward(cdo)
            from torch.distributed.tensor.experimental._attention import context_parallel_unshard

            got = context_parallel_unshard(mesh, [out.detach(), cq.grad, ck.grad, cv.grad], [2, 2, 2, 2])
        return {"patched": patched, "errors": _errors(got, want_global), "ops": _summary(log.ops)}

    def bench(head_major: bool):
        cp_attention._cp_options.enable_load_balance = True
        to_local = lambda t: shard(t.transpose(1, 2), layout="zigzag")  # [B, S/W, H, D], zigzag
        loc = []
        for t in (q, k, v):
            x = to_local(t)
            leaf = (x.transpose(1, 2).contiguous() if head_major else x.contiguous()).requires_grad_(True)
            loc.append(leaf)
        views = [t if head_major else t.transpose(1, 2) for t in loc]  # [B, H, S/W, D] either way
        marker = torch.zeros(seq, dtype=torch.int8, device=dev)
        log = _OpLog()
        with context_parallel(mesh, buffers=[marker], buffer_seq_dims=[0], no_restore_buffers={marker}):
            patched = F.scaled_dot_product_attention is not original_sdpa
            with log:
                out = F.scaled_dot_product_attention(*views, is_causal=True)
                out.backward(to_local(do).transpose(1, 2))
        grads = [t.grad if head_major else t.grad.transpose(1, 2) for t in loc]
        want = [to_local(w).transpose(1, 2) for w in want_global]
        return {"patched": patched, "errors": _errors([out.detach(), *grads], want), "ops": _summary(log.ops)}

    def bench_strategy(probe_mesh: bool = False):
        # The benchmark's torch CP Strategy (its context factory and forward) on the
        # inputs of bench_bshd: separates the strategy's machinery from the check's inputs.
        # It records whether SDPA is patched inside the context and which ops ran (in
        # session 5 it was not: the Strategy never entered context_parallel, now fixed);
        # ``probe_mesh`` hands the Strategy this probe's mesh instead of its own.
        from . import sp_peers

        name = f"torch_cp_{rotate}@normal"  # the rotate method of the loop below, at call time
        if probe_mesh:
            sp_peers._MESHES[(world, id(None))] = mesh
        else:
            sp_peers._MESHES.pop((world, id(None)), None)
        strategy = sp_peers.build(name, {"heads": h, "kv_heads": h, "causal": True}, {"high": None, "normal": None},
                                  world, dev, seq)
        to_local = lambda t: shard(t.transpose(1, 2), layout="zigzag")  # [B, S/W, H, D], zigzag
        loc = [to_local(t).contiguous().requires_grad_(True) for t in (q, k, v)]
        log = _OpLog()
        with strategy.context():
            patched = F.scaled_dot_product_attention is not original_sdpa
            with log:
                out = strategy.forward(*loc)
                out.backward(to_local(do))
        want = [to_local(w) for w in want_global]
        return {"strategy": name, "patched": patched, "errors": _errors([out.detach(), *(t.grad for t in loc)], want),
                "ops": _summary(log.ops)}

    for name, fn in (("torch_test", torch_test), ("bench_bshd", lambda: bench(False)),
                     ("bench_bhsd", lambda: bench(True)), ("bench_strategy", bench_strategy),
                     ("bench_strategy_probe_mesh", lambda: bench_strategy(True))):
        for rotate in cfg["rotate"]:
            cp_attention.set_rotate_method(rotate)
            report["setups"][f"{name}/{rotate}"] = guarded(fn)
            if dev.type == "cuda":
                torch.cuda.synchronize()
    report["setups"].update(_benchmark_check(info, h, d, seq, guarded))
    with contextlib.suppress(Exception):
        torch.distributed.barrier()
    return report


def _benchmark_check(info, heads: int, head_dim: int, seq: int, guarded) -> dict:
    """``sp_attention``'s own correctness check of torch CP, run here as-is and with one
    difference changed: the reference (commflow's naive attention -> SDPA). Until session 5
    it failed (relative error ~20) where the recipes above passed, with either reference:
    the Strategy's context was never entered (sp_peers, fixed); it should pass now."""
    from . import sp_attention as spa
    from . import sp_peers

    p = argparse.ArgumentParser()
    spa._arguments(p)
    a = p.parse_args(["--device", info.device.type, "--nproc", str(info.world_size), "--heads", str(heads),
                      "--head-dim", str(head_dim), "--check-seq", str(seq), "--strategies", "torch_cp_allgather"])
    cfg = spa._config(a)
    groups = spa._groups(cfg, info.device)

    def sdpa_reference(q, k, v, *, causal=False, scale=None):
        return sp_peers._sdpa(q, k, v, causal, scale)  # outside any CP context: plain SDPA

    out = {}
    for name in ("torch_cp_allgather", "torch_cp_allgather@normal", "ulysses"):
        out[f"bench_check/{name}"] = guarded(lambda name=name: spa._check(name, cfg, info, groups))
    naive = spa.attention_reference
    spa.attention_reference = sdpa_reference
    try:
        out["bench_check_sdpa_reference/torch_cp_allgather@normal"] = guarded(
            lambda: spa._check("torch_cp_allgather@normal", cfg, info, groups))
    finally:
        spa.attention_reference = naive
    return out


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: all GPUs)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rotate", default="allgather,alltoall")


@register("sp_cp_probe", "diagnose torch context_parallel: patched SDPA?, ops run, errors (CUDA)", _arguments)
def run(args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("sp_cp_probe needs CUDA GPUs (torch context_parallel has no CPU path)")
    nproc = args.nproc or torch.cuda.device_count()
    cfg = {"seq": args.seq, "heads": args.heads, "head_dim": args.head_dim, "rotate": args.rotate.split(",")}
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    per_rank = spawn(_worker, nproc, cfg, backend=None, init=False, timeout_s=600, env=env)
    return {"config": {**cfg, "nproc": nproc}, "per_rank": per_rank}
