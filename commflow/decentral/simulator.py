"""The vectorized single-process simulator: N nodes as rows of one tensor.

All N models live in ``params [N, P]``. A round is

* local training: ``local_epochs`` epochs of batched SGD
  (:func:`~commflow.decentral.model.sgd_epoch_batched`: one batched matmul per
  layer over every node that still has a minibatch in this step);
* averaging: ``params <- W @ params`` with the round's mixing matrix ``W [N, N]``;
* scoring: every node's model on the shared test set in one broadcast matmul.

``W`` only changes when the schedule changes the network, so it is rebuilt at those
rounds only. A graph of N nodes has O(N) links (BA: about ``2 m N``), so for large N
``W`` is stored sparse (COO) and the product costs O(links x P) instead of O(N^2 P);
``mixing_backend="auto"`` picks sparse when at most 10 % of ``W`` is non-zero.

Numbers match the multi-process mode (:mod:`commflow.decentral.p2p`) for the same
config and schedule: same :func:`~commflow.decentral.experiment.prepare`, same random
streams; only the order of floating-point sums differs (see tests/decentral).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .experiment import Prepared, RunResult
from .metrics import round_record, topology_stats
from .mixing import mixing_matrix
from .model import accuracy_batched, batch_order, init_params, sgd_epoch_batched

__all__ = ["simulate", "mixing_operator"]

MIXING_BACKENDS = ("auto", "dense", "sparse")
SPARSE_DENSITY = 0.10  # at or below this share of non-zeros, a sparse product beats a dense one


def mixing_operator(w: np.ndarray, *, dtype: torch.dtype, backend: str = "auto") -> torch.Tensor:
    """``W [N, N]`` as a dense or sparse (COO) tensor for ``W @ params``."""
    if backend not in MIXING_BACKENDS:
        raise ValueError(f"mixing_backend={backend!r}: choose from {MIXING_BACKENDS}")
    density = np.count_nonzero(w) / w.size
    if backend == "sparse" or (backend == "auto" and density <= SPARSE_DENSITY and w.shape[0] >= 64):
        return torch.tensor(w, dtype=dtype).to_sparse().coalesce()
    return torch.tensor(w, dtype=dtype)


def simulate(
    prep: Prepared,
    *,
    scenario: str = "custom",
    mixing_backend: str = "auto",
    on_round: Callable[[dict], None] | None = None,
) -> RunResult:
    """Run every round of ``prep`` in this process; return the records and final models.

    ``on_round(record)`` is called after each round (progress bars, live logs).
    """
    cfg, plan, ds = prep.config, prep.plan, prep.dataset
    dtype = cfg.torch_dtype
    n = prep.num_nodes
    sizes = prep.data_sizes
    index_np = np.zeros((n, max(1, int(sizes.max()))), dtype=np.int64)
    for i, part in enumerate(prep.parts):
        index_np[i, : len(part)] = part
    index, counts = torch.from_numpy(index_np), torch.from_numpy(sizes)
    x_train, y_train = torch.tensor(ds.x_train, dtype=dtype), torch.from_numpy(ds.y_train)
    x_test, y_test = torch.tensor(ds.x_test, dtype=dtype), torch.from_numpy(ds.y_test)
    params = init_params(prep.layout, n, seed=cfg.seed, same_init=cfg.same_init, dtype=dtype)

    changes = set(plan.change_rounds)
    records: list[dict] = []
    for r in range(cfg.rounds):
        if r in changes:
            topo = plan.topology(r)
            w = mixing_matrix(topo.adjacency, topo.alive, sizes, rule=cfg.mixing, floor=prep.floor_samples)
            op = mixing_operator(w, dtype=dtype, backend=mixing_backend)
            stats = topology_stats(topo)
            trainers = torch.from_numpy(topo.alive) & (counts > 0)
        for e in range(cfg.local_epochs):
            order = torch.from_numpy(batch_order(sizes, seed=cfg.seed, round=r, epoch=e))
            sgd_epoch_batched(params, prep.layout, x_train, y_train, index, counts, order, trainers,
                              lr=cfg.lr, batch_size=cfg.batch_size)
        params = op @ params
        if not cfg.scored(r):
            continue
        acc = accuracy_batched(params, x_test, y_test, prep.layout).numpy()
        rec = round_record(scenario=scenario, round=r, accuracy=acc, params=params, stats=stats, alive=topo.alive)
        records.append(rec)
        if on_round is not None:
            on_round(rec)
    return RunResult(records=records, params=params, dropped=plan.dropped_nodes(), relay_nodes=sorted(plan.relay_nodes))
