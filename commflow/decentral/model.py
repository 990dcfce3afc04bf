"""The node model: a small MLP, held by all nodes at once as one ``[N, P]`` tensor.

Every node has the same architecture ``features -> hidden... -> classes`` (ReLU between
layers), so the models of N nodes are the rows of one parameter matrix ``params
[N, P]``. Averaging is then one matrix product ``W @ params`` and local training is a
batched matmul per layer (``torch.matmul`` over the node dimension). Each row is laid out layer by layer,
weight ``[d_in, d_out]`` (row-major) then bias ``[d_out]``; :class:`MLPLayout` knows
the offsets.

Each batched function has a plain single-node twin (``*_single``), which the
multi-process mode runs and the tests use as the reference.

Local training is plain SGD on the summed cross-entropy of each minibatch divided by
the *nominal* batch size B, so every sample weighs the same in an epoch and a short
last batch takes a proportionally short step (with the batch *mean*, a shard of
``k*B + 1`` samples would end every epoch with a full-size step on one sample, which
visibly destabilises small shards). No momentum and no weight decay, deliberately: a
node with no batch left in this step (a smaller shard, or no data at all) then gets an
exactly-zero update, so padding N shards of different sizes into one batched step
changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .rng import stream

__all__ = [
    "MLPLayout",
    "init_params",
    "init_node_params",
    "forward_batched",
    "forward_single",
    "batch_order",
    "sgd_epoch_batched",
    "sgd_epoch_single",
    "accuracy_batched",
    "accuracy_single",
]


@dataclass(frozen=True)
class MLPLayout:
    """Where each layer's weight and bias sit in a flat parameter row."""

    sizes: tuple[int, ...]
    """``(features, *hidden, classes)``"""

    def __post_init__(self) -> None:
        if len(self.sizes) < 2 or any(s < 1 for s in self.sizes):
            raise ValueError(f"sizes={self.sizes}: need (features, *hidden, classes), all >= 1")

    @property
    def layers(self) -> list[tuple[int, int, int]]:
        """``(offset, d_in, d_out)`` per layer; the bias follows the weight."""
        out, offset = [], 0
        for d_in, d_out in zip(self.sizes[:-1], self.sizes[1:]):
            out.append((offset, d_in, d_out))
            offset += d_in * d_out + d_out
        return out

    @property
    def num_params(self) -> int:
        return sum(d_in * d_out + d_out for _, d_in, d_out in self.layers)


def init_node_params(layout: MLPLayout, node: int, *, seed: int, same_init: bool) -> np.ndarray:
    """One node's initial row ``[P]`` (float64): U(-1/sqrt(d_in), 1/sqrt(d_in)) per layer.

    This is ``torch.nn.Linear``'s default range. With ``same_init`` every node gets the
    draw of node 0 (all start from one model); otherwise each node its own stream.
    """
    rng = stream(seed, "init", 0 if same_init else node)
    row = np.empty(layout.num_params, dtype=np.float64)
    for offset, d_in, d_out in layout.layers:
        bound = 1.0 / math.sqrt(d_in)
        row[offset : offset + d_in * d_out + d_out] = rng.uniform(-bound, bound, d_in * d_out + d_out)
    return row


def init_params(layout: MLPLayout, num_nodes: int, *, seed: int, same_init: bool, dtype: torch.dtype) -> torch.Tensor:
    """All nodes' initial parameters ``[N, P]``; row i equals :func:`init_node_params` of node i."""
    if same_init:
        rows = np.broadcast_to(init_node_params(layout, 0, seed=seed, same_init=True), (num_nodes, layout.num_params))
    else:
        rows = np.stack([init_node_params(layout, i, seed=seed, same_init=False) for i in range(num_nodes)])
    return torch.tensor(np.ascontiguousarray(rows), dtype=dtype)


def _layer(params: torch.Tensor, offset: int, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of one layer in ``params [..., P]``: weight ``[..., d_in, d_out]``, bias ``[..., 1, d_out]``."""
    w = params[..., offset : offset + d_in * d_out].unflatten(-1, (d_in, d_out))
    b = params[..., offset + d_in * d_out : offset + d_in * d_out + d_out].unflatten(-1, (1, d_out))
    return w, b


def forward_batched(params: torch.Tensor, x: torch.Tensor, layout: MLPLayout) -> torch.Tensor:
    """Logits of N models at once.

    Args:
        params: ``[N, P]``.
        x: ``[N, B, features]`` (each node its own batch) or ``[B, features]`` (one batch
            shared by all nodes, e.g. the test set).

    Returns:
        ``[N, B, classes]``.
    """
    h = x
    last = len(layout.layers) - 1
    for i, (offset, d_in, d_out) in enumerate(layout.layers):
        w, b = _layer(params, offset, d_in, d_out)  # [N, d_in, d_out], [N, 1, d_out]
        h = torch.matmul(h, w) + b  # [N, B, d_out]; a shared [B, d_in] input broadcasts over N
        if i < last:
            h = torch.relu(h)
    return h


def forward_single(params: torch.Tensor, x: torch.Tensor, layout: MLPLayout) -> torch.Tensor:
    """Reference for one node: ``params [P]``, ``x [B, features]`` -> logits ``[B, classes]``."""
    h = x
    last = len(layout.layers) - 1
    for i, (offset, d_in, d_out) in enumerate(layout.layers):
        w = params[offset : offset + d_in * d_out].view(d_in, d_out)
        b = params[offset + d_in * d_out : offset + d_in * d_out + d_out]
        h = h @ w + b
        if i < last:
            h = torch.relu(h)
    return h


def batch_order(counts: np.ndarray, *, seed: int, round: int, epoch: int) -> np.ndarray:
    """Each node's visiting order of its shard in ``(round, epoch)``: ``[N, max(counts)]`` int64.

    Row i starts with a permutation of ``range(counts[i])`` (the rest is padding). One
    draw of ``[N, max_n]`` keys from the ``("batches", round, epoch)`` stream serves
    all nodes, so a process that runs only node i computes the same row i.
    """
    n, width = len(counts), max(1, int(np.max(counts, initial=0)))
    keys = stream(seed, "batches", round, epoch).random((n, width))
    keys[np.arange(width)[None, :] >= counts[:, None]] = np.inf
    return np.argsort(keys, axis=1, kind="stable")


def sgd_epoch_batched(
    params: torch.Tensor,
    layout: MLPLayout,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    index: torch.Tensor,
    counts: torch.Tensor,
    order: torch.Tensor,
    trainers: torch.Tensor,
    *,
    lr: float,
    batch_size: int,
) -> None:
    """One local epoch of minibatch SGD on every node in ``trainers``, in place.

    Args:
        params: ``[N, P]``, updated in place.
        x_train, y_train: ``[n_train, features]``, ``[n_train]``: the whole training set.
        index: ``[N, max_n]`` shard of each node (indices into the training set, padded).
        counts: ``[N]`` shard sizes. order: ``[N, max_n]`` from :func:`batch_order`.
        trainers: ``[N]`` bool: nodes that train this round (alive and holding data).

    Step s takes positions ``order[:, s*B:(s+1)*B]`` of each shard; a node whose shard
    is used up has no rows in the step and is left out of it.
    """
    active_counts = counts[trainers]
    if active_counts.numel() == 0 or int(active_counts.max()) == 0:
        return
    steps = math.ceil(int(active_counts.max()) / batch_size)
    for s in range(steps):
        pos = order[:, s * batch_size : (s + 1) * batch_size]  # [N, b]
        valid = (s * batch_size + torch.arange(pos.shape[1]))[None, :] < counts[:, None]  # [N, b]
        nodes = torch.nonzero(trainers & valid[:, 0]).squeeze(1)  # [k] nodes with >= 1 sample left
        if nodes.numel() == 0:
            break
        rows = index[nodes].gather(1, pos[nodes])  # [k, b] training-set indices
        mask = valid[nodes].to(params.dtype)  # [k, b]
        p = params[nodes].requires_grad_(True)  # [k, P]
        logits = forward_batched(p, x_train[rows], layout)  # [k, b, C]
        ce = F.cross_entropy(logits.flatten(0, 1), y_train[rows].flatten(), reduction="none").view_as(mask)
        # Sum over nodes of each node's loss (sum over its batch / B): node i's gradient is its own loss's.
        loss = (ce * mask).sum() / batch_size
        (grad,) = torch.autograd.grad(loss, p)
        params[nodes] = p.detach() - lr * grad


def sgd_epoch_single(
    params: torch.Tensor,
    layout: MLPLayout,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    shard: torch.Tensor,
    order_row: torch.Tensor,
    *,
    lr: float,
    batch_size: int,
) -> torch.Tensor:
    """Reference: one node's epoch. ``params [P]``, ``shard [n_i]``, ``order_row [>= n_i]``; returns new params."""
    n = shard.numel()
    for start in range(0, n, batch_size):
        rows = shard[order_row[start : min(start + batch_size, n)]]
        p = params.detach().requires_grad_(True)
        loss = F.cross_entropy(forward_single(p, x_train[rows], layout), y_train[rows], reduction="sum") / batch_size
        (grad,) = torch.autograd.grad(loss, p)
        params = p.detach() - lr * grad
    return params


@torch.no_grad()
def accuracy_batched(
    params: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, layout: MLPLayout, *, chunk: int = 256
) -> torch.Tensor:
    """Test accuracy of every node ``[N]`` (float64), ``chunk`` nodes at a time to bound memory."""
    out = []
    for start in range(0, params.shape[0], chunk):
        pred = forward_batched(params[start : start + chunk], x_test, layout).argmax(-1)  # [c, T]
        out.append((pred == y_test).to(torch.float64).mean(1))
    return torch.cat(out)


@torch.no_grad()
def accuracy_single(params: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, layout: MLPLayout) -> float:
    """Reference: one node's test accuracy."""
    return (forward_single(params, x_test, layout).argmax(-1) == y_test).to(torch.float64).mean().item()
