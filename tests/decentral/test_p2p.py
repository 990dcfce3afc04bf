"""The multi-process mode (one gloo rank per node, isend/irecv) gives the simulator's numbers."""

from __future__ import annotations

import pytest
import torch

from commflow.decentral import (
    DecentralConfig,
    DropNodes,
    FailLinks,
    Rejoin,
    Schedule,
    prepare,
    run_node,
    run_p2p,
    simulate,
)
from commflow.dist import RankFailure

NODES = 4
# Both modes run float64 with identical data, inits and minibatch orders; they differ only
# in the order of floating-point sums (bmm vs mm, W @ X vs a loop over neighbours), so
# parameters agree to ~1e-15 per step; 1e-10 leaves room for a few hundred SGD steps.
PARAMS_ATOL = 1e-10

CASES = [
    # Relay hub dropped at round 1, a link fails at 2, everything back at 3; data-size weights with a floor.
    (DecentralConfig(nodes=NODES, graph="ba:m=2", mixing="data", floor=0.3, split="dirichlet", alpha=0.5,
                     rounds=4, batch_size=32, dtype="float64", hidden=(16,), seed=5),
     Schedule(events=(DropNodes(at=1, count=1, by="degree", holds_data=False), FailLinks(at=2, count=1),
                      Rejoin(at=3)))),
    # A data-holding node leaves for good; Metropolis-Hastings; nodes start from different models.
    (DecentralConfig(nodes=NODES, graph="ring", mixing="metropolis", rounds=3, batch_size=32, local_epochs=2,
                     same_init=False, dtype="float64", hidden=(16,), seed=1),
     Schedule(events=(DropNodes(at=1, nodes=(2,)),))),
    # No disruption, uniform weights, scored every other round.
    (DecentralConfig(nodes=NODES, graph="ba:m=1", mixing="uniform", rounds=3, batch_size=32, dtype="float64",
                     hidden=(16,), seed=2, eval_every=2),
     Schedule()),
]


def _run_cases(cases):
    return [run_node(cfg, sched, scenario=f"case{k}") for k, (cfg, sched) in enumerate(cases)]


def test_multi_process_mode_equals_the_simulator(dist_pool):
    per_rank = dist_pool(NODES).run(_run_cases, CASES, timeout_s=300)
    assert all(r is None for rank in per_rank[1:] for r in rank), "only rank 0 reports"
    for k, ((cfg, sched), p2p) in enumerate(zip(CASES, per_rank[0])):
        sim = simulate(prepare(cfg, sched), scenario=f"case{k}")
        torch.testing.assert_close(p2p.params, sim.params, rtol=0, atol=PARAMS_ATOL, msg=f"case {k}")
        assert p2p.dropped == sim.dropped and p2p.relay_nodes == sim.relay_nodes
        assert [r["round"] for r in p2p.records] == [r["round"] for r in sim.records]
        assert [r["round"] for r in sim.records] == [r for r in range(cfg.rounds) if cfg.scored(r)]
        for a, b in zip(p2p.records, sim.records):
            for key in ("scenario", "round", "mean_acc", "min_acc", "max_acc", "giant_acc", "alive", "links",
                        "components", "giant_size", "isolated"):
                assert a[key] == b[key], f"case {k} round {a['round']}: {key} {a[key]} != {b[key]}"
            assert a["consensus_dist"] == pytest.approx(b["consensus_dist"], rel=1e-9)
        # Anti-vacuity: training moved the models and the disruption showed up in the records.
        assert sim.records[-1]["mean_acc"] > 0.3
    assert [r["alive"] for r in per_rank[0][0].records] == [4, 3, 3, 4]


def test_too_many_processes_are_refused_before_spawning():
    with pytest.raises(ValueError, match="nodes=100: the multi-process mode starts one process per node"):
        run_p2p(DecentralConfig(nodes=100, rounds=1), Schedule())


def _wrong_world(cfg):
    return run_node(cfg, Schedule())


def test_world_size_mismatch_fails_on_every_rank_before_any_message(dist_pool):
    cfg = DecentralConfig(nodes=6, rounds=2)
    with pytest.raises(RankFailure, match="world size 4 != nodes=6"):
        dist_pool(NODES).run(_wrong_world, cfg, timeout_s=120)
