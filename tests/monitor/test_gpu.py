"""GPU paths (skipped without CUDA): CUDA-event completion and the NCCL probe.

Run on the GPU machine: ``python -m pytest tests/monitor/test_gpu.py -q``.
"""

from __future__ import annotations

import statistics

import pytest
import torch

pytestmark = pytest.mark.gpu


def _cuda_records(nccl_timing: bool) -> dict:
    import time

    import torch.distributed as dist

    from commflow import monitor

    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    x = torch.ones(1 << 20, device="cuda")
    dist.all_reduce(x)  # the communicator's set-up, outside the records
    torch.cuda.synchronize()
    tr = monitor.watch(infer_iterations=False, nccl_timing=nccl_timing)
    try:
        x.fill_(1.0)
        monitor.step(0)
        for blocking in (True, False):
            for _ in range(5):
                if rank == 1:
                    torch.cuda._sleep(20_000_000)  # rank 1 arrives late on the GPU
                if blocking:
                    dist.all_reduce(x)
                else:
                    dist.all_reduce(x, async_op=True).wait()
        torch.cuda.synchronize()
        time.sleep(0.1)
        tr.poll()
        recs = [(r.op, r.nbytes, r.dur, r.t_done is not None) for r in tr.records()]
        timed_by = ["nccl" if r.nccl_timed else "events" for r in tr.records()]
    finally:
        monitor.unwatch()
    return {"rank": rank, "recs": recs, "timed_by": timed_by}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("nccl_timing", [True, False], ids=["nccl-timing", "tracer-events"])
def test_cuda_marks_time_every_collective_and_show_the_late_rank(nccl_timing):
    from commflow.dist import spawn

    out = spawn(_cuda_records, 2, nccl_timing, backend="nccl", init=True, timeout_s=300)
    durs = {}
    for res in out:
        # Blocking calls: the tracer's two events; async ones: NCCL's timing of the work.
        assert res["timed_by"] == ["events"] * 5 + ["nccl" if nccl_timing else "events"] * 5
        assert len(res["recs"]) == 10
        assert all(done and dur is not None and dur >= 0 for _, _, dur, done in res["recs"])
        assert all(nbytes == 4 << 20 for _, nbytes, _, _ in res["recs"])
        durs[res["rank"]] = [d for _, _, d, _ in res["recs"]]
    # Rank 0 waits for rank 1's ~10 ms sleep kernel inside the all-reduces; rank 1 does
    # not (medians: a host hiccup may let one call's sleep finish before rank 0 arrives).
    # Async calls timed by the host (no NCCL timing) end when the poll sees them: no signal.
    for part in (slice(0, 5), slice(5, 10)) if nccl_timing else (slice(0, 5),):
        d0, d1 = statistics.median(durs[0][part]), statistics.median(durs[1][part])
        assert d0 > d1 + 0.004, (durs[0], durs[1])


def _nccl_probe() -> dict:
    import os

    import torch.distributed as dist

    from commflow.monitor.localize import sweep_in_thread

    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    rows = sweep_in_thread(store_addr=(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])), prefix="gpu-probe",
                           rank=rank, world=dist.get_world_size(), nbytes=64 << 20, reps=3, timeout_s=5.0,
                           edge_delay=None, backend="nccl", device=rank)
    return {str(k): v for k, v in rows.items()}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_probe_measures_every_edge():
    from commflow.dist import spawn
    from commflow.monitor.localize import analyze_matrix, matrix_from_rows

    n = min(4, torch.cuda.device_count())
    rows = spawn(_nccl_probe, n, backend="nccl", init=True, timeout_s=300)
    m = matrix_from_rows(dict(enumerate(rows)), n)
    off = ~torch.eye(n, dtype=torch.bool).numpy()
    assert (m[off] > 0).all() and (m[off] < 1.0).all()  # 64 MiB over NVLink: well under a second
    assert analyze_matrix(m).where == "none"  # healthy machine: no finding


def _probe_beside_the_job() -> dict:
    import os
    import threading
    import time

    import torch.distributed as dist

    from commflow.monitor.localize import sweep_in_thread

    rank, world = dist.get_rank(), dist.get_world_size()
    if os.environ.get("COMMFLOW_TEST_DUMP_S"):  # where it stands, if it hangs
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["COMMFLOW_TEST_DUMP_S"]), exit=False)
    torch.cuda.set_device(rank)
    x = torch.ones(16 << 20, device="cuda")
    result: dict = {}

    def probe() -> None:
        result["rows"] = sweep_in_thread(
            store_addr=(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])), prefix="gpu-probe-online",
            rank=rank, world=world, nbytes=16 << 20, reps=3, timeout_s=5.0, edge_delay=None,
            backend="nccl", device=rank)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    # The job keeps queueing collectives on its (default) stream, the ranks out of step
    # with each other, the way the online probe meets a running job. A probe on the
    # job's stream deadlocked here: its transfer waited for the job's queued collective
    # on one rank while the job waited for the probe on the other.
    # Every 8 iterations the ranks agree whether to go on (some probe still running and
    # time left), so they issue the same number of collectives; that agreement's read
    # is the sync that keeps the host a few iterations ahead.
    deadline = time.time() + 30
    it = 0
    while True:
        torch.cuda._sleep(2_000_000 * (rank + 1))
        dist.all_reduce(x)
        it += 1
        if it % 8 == 0:
            go = torch.tensor([float(t.is_alive() and time.time() < deadline)], device="cuda")
            dist.all_reduce(go, op=dist.ReduceOp.MAX)
            if go.item() == 0.0:
                break
    torch.cuda.synchronize()
    t.join(timeout=max(0.0, deadline - time.time()))
    return {"finished": not t.is_alive(), "rows": {str(k): v for k, v in result.get("rows", {}).items()}}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_the_online_probe_runs_beside_a_job_that_keeps_its_stream_busy():
    from commflow.dist import spawn
    from commflow.monitor.localize import matrix_from_rows

    n = min(4, torch.cuda.device_count())
    out = spawn(_probe_beside_the_job, n, backend="nccl", init=True, timeout_s=300)
    assert all(r["finished"] for r in out)
    m = matrix_from_rows({i: r["rows"] for i, r in enumerate(out)}, n)
    off = ~torch.eye(n, dtype=torch.bool).numpy()
    assert (m[off] > 0).all() and (m[off] < 5.0).all()  # every edge delivered within the timeout
