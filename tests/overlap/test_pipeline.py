"""The CPU pipeline issues each chunk's communication as soon as the chunk exists, keeps
one chunk's work in flight while the next computes, and orders collectives identically
on every rank (gloo matches collectives by order, as NCCL does)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from commflow.dist import all_gather_tensor
from commflow.overlap.pipeline import communicate_then_consume, produce_then_communicate

CPU = torch.device("cpu")


def _produce_then_communicate() -> tuple[list[str], list[float]]:
    log: list[str] = []
    sums: list[float] = []

    def produce(c):
        log.append(f"gemm{c}")
        return torch.full((4,), float(c + 1))

    def communicate(c, part):
        log.append(f"issue{c}a")
        yield dist.all_reduce(part, async_op=True)
        log.append(f"issue{c}b")  # runs only once the first collective is done
        doubled = part * 2
        yield dist.all_reduce(doubled, async_op=True)
        sums.append(doubled[0].item())
        log.append(f"done{c}")

    produce_then_communicate(CPU, 3, produce, communicate)
    return log, sums


def test_produce_then_communicate_order(dist_pool):
    world = 2
    for log, sums in dist_pool(world).run(_produce_then_communicate):
        assert log == [
            "gemm0", "issue0a",
            "gemm1", "issue1a", "issue0b", "done0",  # chunk 1 in flight before chunk 0 finishes
            "gemm2", "issue2a", "issue1b", "done1",
            "issue2b", "done2",
        ]
        # (c+1) summed over ranks, doubled, summed again.
        assert sums == [(c + 1) * world * 2 * world for c in range(3)]


def _communicate_then_consume() -> tuple[list[str], list[float]]:
    log: list[str] = []
    landed = [torch.empty(2 * dist.get_world_size()) for _ in range(2)]

    def communicate(c):
        log.append(f"gather{c}")
        mine = torch.full((2,), float(10 * c + dist.get_rank()))
        yield all_gather_tensor(landed[c], mine, async_op=True)
        log.append(f"landed{c}")

    def local_work():
        log.append("local")

    consumed = []

    def consume(c):
        log.append(f"use{c}")
        consumed.append(landed[c].sum().item())

    communicate_then_consume(CPU, 2, communicate, local_work, consume)
    return log, consumed


def test_communicate_then_consume_order(dist_pool):
    for log, consumed in dist_pool(2).run(_communicate_then_consume):
        # Every gather in flight before the local GEMM; each chunk used right after it lands.
        assert log == ["gather0", "gather1", "local", "landed0", "use0", "landed1", "use1"]
        assert consumed == [2 * (0 + 1), 2 * (10 + 11)]
