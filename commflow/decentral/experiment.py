"""One experiment: a config and a schedule, prepared identically for every execution mode.

:class:`DecentralConfig` is the whole setup of a run (the CLI maps onto it one to one).
:func:`prepare` builds everything both modes need from ``(config, schedule)`` alone:
the graph, the resolved :class:`~commflow.decentral.schedule.Plan`, the dataset and
its partition (relay-only nodes get no data). The simulator and each process of the
multi-process mode call it and get the same objects, which is half of why they
produce the same numbers (the other half is :mod:`commflow.decentral.rng`).

One round ``r`` (the order of DecAvg / D-PSGD "adapt then combine"):

1. apply the schedule's events at ``r`` (drops, link failures, rejoins);
2. each alive node with data runs ``local_epochs`` epochs of minibatch SGD on its shard;
3. each alive node replaces its model by the weighted average of its closed live
   neighbourhood (:mod:`commflow.decentral.mixing`);
4. metrics of the models every node now holds (:mod:`commflow.decentral.metrics`), every
   ``eval_every`` rounds and after the last.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import networkx as nx
import numpy as np
import torch

from .data import SPLITS, Dataset, load_digits_dataset, partition
from .graphs import build_graph, parse_graph_spec
from .mixing import MIXING_RULES
from .model import MLPLayout
from .schedule import Plan, Schedule, resolve

__all__ = ["DecentralConfig", "Prepared", "RunResult", "prepare"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(kw_only=True, slots=True)
class DecentralConfig:
    """Setup of one decentralized-learning run (everything but the disruption schedule)."""

    nodes: int | None = 100
    """Number of nodes N (None: only for ``file:`` graphs, the file decides)."""
    graph: str = "ba:m=2"
    """Graph spec, see :mod:`commflow.decentral.graphs`."""
    mixing: str = "metropolis"
    """Averaging rule: ``uniform`` | ``metropolis`` | ``data``."""
    floor: float = 0.1
    """``data`` rule only: minimum weight of a node, as a fraction of the mean shard size
    of the data-holding nodes (0 = pure data weighting, which silences relay-only nodes)."""
    split: str = "iid"
    """Partition of the training set over data-holding nodes: ``iid`` | ``dirichlet``."""
    alpha: float = 0.5
    """Dirichlet concentration for ``split="dirichlet"``."""
    hidden: tuple[int, ...] = (32,)
    """Hidden layer widths of the MLP (input 64 pixels, output 10 classes)."""
    lr: float = 0.3
    """SGD learning rate."""
    batch_size: int = 8
    """Minibatch size of local training."""
    local_epochs: int = 1
    """Local epochs per round (0: no training, averaging only)."""
    rounds: int = 100
    """Rounds of local training + averaging."""
    eval_every: int = 1
    """Score the models every this many rounds (and always after the last); scoring every
    node on the test set dominates the cost at 1,000 nodes."""
    same_init: bool = True
    """All nodes start from one model (True) or each from its own draw."""
    test_fraction: float = 0.25
    """Share of digits held out as the common test set."""
    dtype: str = "float32"
    """``float32`` | ``float64`` (float64 for bit-level comparisons between modes)."""
    seed: int = 0
    """Seed of every random stream (graph, split, init, batches, schedule)."""

    def __post_init__(self) -> None:
        parse_graph_spec(self.graph)  # raises on a bad spec
        checks = [
            (self.nodes is None or self.nodes >= 2, "nodes", self.nodes, ">= 2"),
            (self.nodes is not None or self.graph.startswith("file:"), "nodes", self.nodes,
             "given unless the graph is a file"),
            (self.mixing in MIXING_RULES, "mixing", self.mixing, f"one of {MIXING_RULES}"),
            (self.floor >= 0, "floor", self.floor, ">= 0"),
            (self.split in SPLITS, "split", self.split, f"one of {SPLITS}"),
            (self.alpha > 0, "alpha", self.alpha, "> 0"),
            (len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden), "hidden", self.hidden,
             "one or more widths >= 1"),
            (self.lr >= 0, "lr", self.lr, ">= 0"),
            (self.batch_size >= 1, "batch_size", self.batch_size, ">= 1"),
            (self.local_epochs >= 0, "local_epochs", self.local_epochs, ">= 0"),
            (self.rounds >= 1, "rounds", self.rounds, ">= 1"),
            (self.eval_every >= 1, "eval_every", self.eval_every, ">= 1"),
            (0 < self.test_fraction < 1, "test_fraction", self.test_fraction, "in (0, 1)"),
            (self.dtype in DTYPES, "dtype", self.dtype, f"one of {sorted(DTYPES)}"),
            (self.seed >= 0, "seed", self.seed, ">= 0"),
        ]
        for ok, name, value, rule in checks:
            if not ok:
                raise ValueError(f"{name}={value!r}: must be {rule}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def scored(self, round: int) -> bool:
        """Whether round ``round`` is scored (and gets a metrics record)."""
        return (round + 1) % self.eval_every == 0 or round == self.rounds - 1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Prepared:
    """Everything a run needs, derived from ``(config, schedule)`` only."""

    config: DecentralConfig
    graph: nx.Graph
    plan: Plan
    dataset: Dataset
    parts: list[np.ndarray]
    """Per node: indices into the training set (empty for relay-only nodes)."""
    floor_samples: float
    """The ``data`` rule's floor in samples (``config.floor`` x mean holder shard)."""
    layout: MLPLayout

    @property
    def num_nodes(self) -> int:
        return self.graph.number_of_nodes()

    @property
    def data_sizes(self) -> np.ndarray:
        """``[N]`` samples per node."""
        return np.array([len(p) for p in self.parts], dtype=np.int64)


def prepare(config: DecentralConfig, schedule: Schedule) -> Prepared:
    """Graph, plan, data and partition of a run; deterministic in ``(config, schedule)``."""
    graph = build_graph(config.graph, config.nodes, config.seed)
    n = graph.number_of_nodes()
    if config.nodes is not None and n != config.nodes:
        raise ValueError(f"nodes={config.nodes} but graph {config.graph!r} has {n} nodes")
    plan = resolve(schedule, graph, rounds=config.rounds, seed=config.seed)
    dataset = load_digits_dataset(seed=config.seed, test_fraction=config.test_fraction)
    holders = [i for i in range(n) if i not in plan.relay_nodes]
    parts = partition(dataset.y_train, num_nodes=n, holders=holders, split=config.split,
                      alpha=config.alpha, seed=config.seed)
    floor_samples = config.floor * len(dataset.y_train) / len(holders)
    layout = MLPLayout((dataset.features, *config.hidden, dataset.num_classes))
    return Prepared(config=config, graph=graph, plan=plan, dataset=dataset, parts=parts,
                    floor_samples=floor_samples, layout=layout)


@dataclass
class RunResult:
    """What one run of one scenario produced."""

    records: list[dict]
    """One metrics record per round (see :mod:`commflow.decentral.metrics`)."""
    params: torch.Tensor
    """Final models ``[N, P]``."""
    dropped: list[int]
    """Nodes the schedule drops (in event order)."""
    relay_nodes: list[int]
    """Nodes that held no data."""
