"""CommTimer measures time blocked in communication: a late peer shows up, compute does not."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from commflow.dist import all_gather_tensor
from commflow.train.commtime import CommTimer

LATE_S = 0.3  # rank 1 arrives this late to each collective
SLACK_S = 0.1  # generous: the CI machine is shared


def _late_peer() -> dict:
    rank = dist.get_rank()
    timer = CommTimer("cpu").install()
    try:
        out = {}
        # 1. synchronous collective, through a module-level name bound before install
        timer.step_begin()
        time.sleep(LATE_S if rank == 1 else 0.0)
        t = torch.ones(4)
        dist.all_reduce(t)
        out["sync"] = timer.step_end()
        # 2. asynchronous collective: the launch is cheap, the wait is what counts
        timer.step_begin()
        buf = torch.empty(2 * 4)
        time.sleep(LATE_S if rank == 1 else 0.0)
        work = all_gather_tensor(buf, torch.ones(4), async_op=True)
        work.wait()
        out["async"] = timer.step_end()
        # 3. compute only: nothing counted
        timer.step_begin()
        time.sleep(LATE_S)
        out["compute"] = timer.step_end()
        # 4. DDP through the timer's comm hook: gradients are still the average
        model = torch.nn.Linear(3, 1, bias=False)
        torch.nn.init.constant_(model.weight, 1.0)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ddp.register_comm_hook(None, timer.ddp_comm_hook)
        timer.step_begin()
        ddp(torch.full((1, 3), float(rank + 1))).sum().backward()
        timer.backward_done()
        out["ddp"] = timer.step_end()
        out["grad"] = model.weight.grad.tolist()
        return out
    finally:
        timer.uninstall()


def test_timer_sees_waiting_for_a_late_peer_and_not_compute(dist_pool):
    early, late = dist_pool(2).run(_late_peer)
    assert LATE_S - SLACK_S < early["sync"] < LATE_S + 5 * SLACK_S
    assert late["sync"] < LATE_S - SLACK_S  # the late rank barely waits
    assert LATE_S - SLACK_S < early["async"] < LATE_S + 5 * SLACK_S
    assert early["compute"] == 0.0 and late["compute"] == 0.0
    assert early["ddp"] >= 0.0
    assert early["grad"] == late["grad"] == [[1.5, 1.5, 1.5]]  # mean of inputs 1 and 2
