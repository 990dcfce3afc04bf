"""Multi-process mode: one process per node, models exchanged point-to-point (gloo).

Rank ``i`` of the default process group *is* node ``i``. Each round it trains on its
own shard, then ``dist.isend``s its model to every live neighbour and ``dist.irecv``s
theirs; the message is the flat parameter vector with two numbers appended, the
sender's current degree and data size, which is all the averaging rules need to
weight it (:func:`~commflow.decentral.mixing.mixing_row`). No collective carries
learning traffic; one ``all_gather`` per round carries the *metrics* (each node's
model and accuracy) so rank 0 can write the same records the simulator writes.

How disruption is realised: every process resolves the same plan from the same
``(config, schedule)``, so each knows who is alive and which links are up in each
round. A dropped node's process stays up but goes silent: it neither trains nor sends,
and its neighbours no longer post receives for it (a process that really died would
leave a peer blocked in ``irecv``; detecting that is the monitor's job, not this
mode's). Everything a rank does before the first message (config checks, the plan,
the world-size check) is computed identically on every rank, so bad input raises the
same ``ValueError`` everywhere before anyone communicates.

Meant for a handful of nodes (one process each), to show the simulator's numbers are
what real point-to-point exchange produces; the simulator is for scale.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from commflow.dist import all_gather_tensor, spawn

from .experiment import DecentralConfig, RunResult, prepare
from .metrics import round_record, topology_stats
from .mixing import mixing_row
from .model import accuracy_single, batch_order, init_node_params, sgd_epoch_single
from .schedule import Schedule

__all__ = ["run_node", "run_p2p", "MAX_P2P_NODES"]

MAX_P2P_NODES = 64  # one OS process per node: beyond this, use the simulator


def _exchange_and_average(
    x: torch.Tensor, neighbours: np.ndarray, *, round: int, data_size: int, rule: str, floor: float
) -> torch.Tensor:
    """Swap models with every live neighbour and return this node's weighted average."""
    p = x.numel()
    header = torch.tensor([len(neighbours), data_size], dtype=x.dtype)
    message = torch.cat([x, header])  # [P + 2]: model, degree, data size
    inbox = [torch.empty_like(message) for _ in neighbours]
    requests = [dist.isend(message, int(j), tag=round) for j in neighbours]
    requests += [dist.irecv(buf, int(j), tag=round) for buf, j in zip(inbox, neighbours)]
    for req in requests:
        req.wait()
    w_self, w_nbr = mixing_row(
        rule=rule,
        degree=len(neighbours),
        data_size=data_size,
        neighbour_degrees=np.array([float(m[p]) for m in inbox]),
        neighbour_sizes=np.array([float(m[p + 1]) for m in inbox]),
        floor=floor,
    )
    out = w_self * x
    for w, m in zip(w_nbr, inbox):
        out = out + float(w) * m[:p]
    return out


def run_node(config: DecentralConfig, schedule: Schedule, scenario: str = "custom") -> RunResult | None:
    """Run node ``rank`` for all rounds; call on every rank of a group of N processes.

    Returns the :class:`~commflow.decentral.experiment.RunResult` (records and all final
    models) on rank 0, ``None`` elsewhere. Raises ``ValueError`` on every rank, before
    any communication, if the world size is not the number of nodes.
    """
    if not dist.is_initialized():
        raise ValueError("run_node needs an initialised default process group (see commflow.dist)")
    prep = prepare(config, schedule)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != prep.num_nodes:
        raise ValueError(f"world size {world} != nodes={prep.num_nodes}: the multi-process mode runs one node per rank")
    cfg, plan, ds, layout = prep.config, prep.plan, prep.dataset, prep.layout
    dtype = cfg.torch_dtype
    sizes = prep.data_sizes
    x = torch.tensor(init_node_params(layout, rank, seed=cfg.seed, same_init=cfg.same_init), dtype=dtype)
    shard = torch.from_numpy(prep.parts[rank])
    x_train, y_train = torch.tensor(ds.x_train, dtype=dtype), torch.from_numpy(ds.y_train)
    x_test, y_test = torch.tensor(ds.x_test, dtype=dtype), torch.from_numpy(ds.y_test)
    gathered = torch.empty(world * (layout.num_params + 1), dtype=dtype)

    changes = set(plan.change_rounds)
    records: list[dict] = []
    for r in range(cfg.rounds):
        if r in changes:
            topo = plan.topology(r)
            neighbours = np.flatnonzero(topo.live_adjacency()[rank])
            stats = topology_stats(topo) if rank == 0 else None
        if topo.alive[rank]:
            if shard.numel() > 0:
                for e in range(cfg.local_epochs):
                    order = torch.from_numpy(batch_order(sizes, seed=cfg.seed, round=r, epoch=e)[rank])
                    x = sgd_epoch_single(x, layout, x_train, y_train, shard, order, lr=cfg.lr,
                                         batch_size=cfg.batch_size)
            x = _exchange_and_average(x, neighbours, round=r, data_size=int(sizes[rank]), rule=cfg.mixing,
                                      floor=prep.floor_samples)
        if not cfg.scored(r):
            continue
        acc = accuracy_single(x, x_test, y_test, layout)
        all_gather_tensor(gathered, torch.cat([x, torch.tensor([acc], dtype=dtype)]))
        if rank == 0:
            table = gathered.view(world, layout.num_params + 1)
            records.append(round_record(scenario=scenario, round=r, accuracy=table[:, -1].double().numpy(),
                                        params=table[:, :-1], stats=stats, alive=topo.alive))
    if rank != 0:
        return None
    final = gathered.view(world, layout.num_params + 1)[:, :-1].clone()
    return RunResult(records=records, params=final, dropped=plan.dropped_nodes(), relay_nodes=sorted(plan.relay_nodes))


def run_p2p(config: DecentralConfig, schedule: Schedule, scenario: str = "custom", *,
            timeout_s: float = 600.0) -> RunResult:
    """Spawn one gloo process per node, run :func:`run_node` on each, return rank 0's result."""
    n = prepare(config, schedule).num_nodes  # fail here, in the parent, on bad input
    if n > MAX_P2P_NODES:
        raise ValueError(f"nodes={n}: the multi-process mode starts one process per node and allows at most "
                         f"{MAX_P2P_NODES}; use the simulator (mode='sim') for more")
    results = spawn(run_node, n, config, schedule, scenario, backend="gloo", timeout_s=timeout_s,
                    threads_per_rank=1)
    return results[0]
