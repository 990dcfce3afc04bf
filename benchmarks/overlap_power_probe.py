"""Probe: does a transfer beside a compute-bound kernel slow the kernel, and is it the clock?

Not a registered benchmark (``python -m benchmarks.overlap_power_probe --nproc 4 [--seconds 2]
[--out FILE]``). Two measurements point the same way: the Ulysses probe
(``sp_a2a_probe``) saw an attention kernel lose about half of a copy-engine transfer run
beside it, though copy engines take no SM, and the overlap calibration has a GEMM 2-30 %
slower beside NCCL's all-to-all. If the kernel runs at the card's power limit, any other
work (NVLink, HBM traffic) lowers the SM clock, and no schedule hides a transfer for free.

Every rank runs the same phases at once, each ``--seconds`` long, and the GEMM /
attention loop is timed per phase on the compute stream:

* ``idle``; ``gemm`` (bf16 8192^3, back to back); ``attn`` (causal forward attention,
  ``[1, 131072, 4, 128]``, Ulysses' per-chunk kernel at 128K on 4 ranks);
* ``ce`` / ``nccl``: 64 MB pushes by copy engine into the next peers' symmetric buffers
  (peers in turn) / NCCL all-to-all of 64 MB per peer, back to back on a side stream;
* ``gemm+ce``, ``gemm+nccl``, ``attn+ce``, ``attn+nccl``: both at once.

Rank 0 samples ``nvidia-smi`` (SM clock, power draw, active clock-event reasons of every GPU)
every 50 ms; each phase reports the medians over its middle 60 %.

Found (session 12, 4x H100 at the 700 W limit, ``overlap_power_probe_4xH100_20261127-s12.json``):
idle GPUs sit at 1980 MHz; a sustained GEMM or attention loop alone at 1410-1440 MHz and
695-702 W with the software power cap active (reason 0x4), and runs 15 % (GEMM) / 3 %
(attention) slower than the same call timed in a short burst. Beside copy-engine pushes at
~235 GB/s per rank the GEMM runs 14 % and the attention kernel 28 % slower than alone
(sustained), while their clocks stay level or *rise* (attention: 1530-1620 MHz at 654-671 W):
the copies cost the kernels memory-side, not clock; the copies themselves keep 96 % of their
rate. Beside NCCL's all-to-all the GEMM runs 32 % and the attention 60 % slower, and NCCL
moves half its bytes (168 / 159 vs 319 GB/s).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time

import torch

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
COPY_MB = 64
QUERY = "index,clocks.sm,power.draw,clocks_event_reasons.active"


class ClockSampler:
    """``nvidia-smi`` every 50 ms in the background: (host time, gpu, SM MHz, W, reasons)."""

    def __init__(self):
        self.rows: list[tuple[float, int, float, float, str]] = []
        try:
            self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                                          "-lms", "50"], stdout=subprocess.PIPE, text=True)
        except OSError:
            self.proc = None
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                self.rows.append((time.time(), int(parts[0]), float(parts[1]), float(parts[2]), parts[3]))
            except (ValueError, IndexError):
                continue

    def window(self, t0: float, t1: float) -> dict:
        """Per GPU: median SM clock and power, and the reasons seen, over the middle 60 % of [t0, t1]."""
        a, b = t0 + 0.2 * (t1 - t0), t1 - 0.2 * (t1 - t0)
        out = {}
        for gpu in sorted({r[1] for r in self.rows}):
            sel = [r for r in self.rows if r[1] == gpu and a <= r[0] <= b]
            if sel:
                out[str(gpu)] = {"sm_mhz": statistics.median(r[2] for r in sel),
                                 "power_w": statistics.median(r[3] for r in sel),
                                 "reasons": sorted({r[4] for r in sel}), "samples": len(sel)}
        return out

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()


def _worker(cfg: dict) -> dict:
    import torch.distributed as dist

    from benchmarks.timing import max_over_ranks
    from commflow.dist import init_distributed
    from commflow.overlap import symm
    from commflow.overlap.validate import check_group
    from commflow.sp.kernels import attention_forward

    info = init_distributed(device="cuda")
    dev, world, rank = info.device, info.world_size, info.rank
    g = check_group(None, dev)
    seconds = float(cfg["seconds"])
    main = torch.cuda.current_stream(dev)
    side = torch.cuda.Stream(dev, priority=-1)

    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    gen = torch.Generator(device=dev).manual_seed(rank)
    q, k, v = (torch.randn(1, 131072, 4, 128, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    n = (COPY_MB << 20) // 2
    ws = symm.workspace(g, "power_probe", dev)
    ws.ensure(world * n * 2)
    local = torch.randn(n, device=dev, dtype=torch.bfloat16)
    send = torch.randn(world * n, device=dev, dtype=torch.bfloat16)
    recv = torch.empty_like(send)
    peers = [(rank + s) % world for s in range(1, world)]

    # Every loop body takes the call's index (the pushes turn through the peers with it).
    kernels = {"gemm": lambda i: torch.mm(a, b),
               "attn": lambda i: attention_forward(q, k, v, causal=True, scale=128 ** -0.5)}

    def push(i: int):
        ws.view(peers[i % len(peers)], (n,), torch.bfloat16, rank * n).copy_(local)

    def nccl(i: int):
        dist.all_to_all_single(recv, send)

    transfers = {"ce": push, "nccl": nccl}

    def one_ms(fn) -> float:
        for i in range(2):
            fn(i)
        torch.cuda.synchronize(dev)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for i in range(5):
            fn(i)
        e1.record()
        e1.synchronize()
        return max_over_ranks(e0.elapsed_time(e1) / 5)

    unit = {name: one_ms(fn) for name, fn in {**kernels, **transfers}.items()}
    sampler = ClockSampler() if rank == 0 else None
    phases = ["idle", "gemm", "attn", "ce", "nccl", "gemm+ce", "gemm+nccl", "attn+ce", "attn+nccl"]
    rows = []
    for phase in phases:
        parts = phase.split("+")
        kern = next((p for p in parts if p in kernels), None)
        xfer = next((p for p in parts if p in transfers), None)
        dist.barrier()
        torch.cuda.synchronize(dev)
        t0 = time.time()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        n_x = max(1, round(seconds * 1e3 / unit[xfer])) if xfer else 0
        n_k = max(1, round(seconds * 1e3 / unit[kern])) if kern else 0
        # Issued in proportion (a launch queue holds ~1000 calls: issuing every transfer
        # first would block the host, and start the kernels, until most had run).
        side.wait_stream(main)
        ev[0].record(main)
        ev[2].record(side)
        issued = 0
        for j in range(max(n_k, 1)):
            if kern:
                kernels[kern](j)
            upto = n_x if j == max(n_k, 1) - 1 else (j + 1) * n_x // max(n_k, 1)
            with torch.cuda.stream(side):
                while issued < upto:
                    transfers[xfer](issued)
                    issued += 1
        ev[1].record(main)
        ev[3].record(side)
        if not kern and not xfer:
            time.sleep(seconds)
        torch.cuda.synchronize(dev)
        t1 = time.time()
        row = {"phase": phase}
        if kern:
            row[f"{kern}_ms_per_call"] = max_over_ranks(ev[0].elapsed_time(ev[1]) / n_k)
            row[f"{kern}_slowdown"] = row[f"{kern}_ms_per_call"] / unit[kern]
        if xfer:
            ms = max_over_ranks(ev[2].elapsed_time(ev[3]) / n_x)
            moved = COPY_MB * 2**20 * (1 if xfer == "ce" else world - 1)
            row[f"{xfer}_ms_per_call"] = ms
            row[f"{xfer}_gbps_per_rank"] = moved / ms / 1e6
        if sampler is not None:
            time.sleep(0.1)  # the last samples of the window
            row["gpus"] = sampler.window(t0, t1)
            print(json.dumps({k2: v for k2, v in row.items() if k2 != "gpus"}), json.dumps(
                {gpu: (s["sm_mhz"], s["power_w"]) for gpu, s in row["gpus"].items()}), flush=True)
        rows.append(row)
        time.sleep(0.5)
    if sampler is not None:
        sampler.stop()
    dist.barrier()
    return {"unit_ms": unit, "rows": rows, "torch": torch.__version__, "seconds": seconds, "copy_mb": COPY_MB}


def main(argv=None) -> int:
    from benchmarks.results import probe_main

    return probe_main("overlap_power_probe", _worker, argv, __doc__, nproc=4, options={"seconds": 2},
                      timeout_s=300, env=ENV)


if __name__ == "__main__":
    sys.exit(main())
