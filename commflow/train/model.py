"""Linear-Llama: Llama blocks whose attention is linear (LASP-2) or softmax, layer by layer.

The model of the LASP-2 paper (Sun et al., 2025, "LASP-2: Rethinking Sequence
Parallelism for Linear Attention and Its Hybrid"): a Llama-3 stack (pre-RMSNorm,
SwiGLU feed-forward, RoPE on softmax layers) where a pattern such as ``"LLLS"``
(LASP-2H's 3:1 hybrid) chooses per layer between

* ``L``, linear attention with a scalar forgetting term per head: none, a constant
  per-head decay (RetNet / Lightning) or a data-dependent gate (Simple GLA / Mamba-2),
  followed by a per-head RMSNorm (the GroupNorm of RetNet and GLA), and
* ``S``, causal softmax attention with RoPE and optional grouped KV heads.

Every rank holds ``[B, S_local]`` tokens of the sequence, at the global positions it
is given (RoPE needs them); attention crosses ranks through
:mod:`commflow.train.attention`. Everything else is per token, so it needs no
communication. The forward can compute the loss itself, in token chunks that are
recomputed in the backward, so the ``[tokens, vocab]`` logits of a long sequence are
never held at once (and FSDP2 sees the output head used inside a module forward).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import SequenceParallel, linear_attention, softmax_attention
from .config import ModelConfig
from .data import IGNORE

__all__ = ["Block", "LinearAttention", "LinearLlama", "LossOutput", "SoftmaxAttention", "apply_rope"]

GATE_LOGIT_SCALE = 1.0
"""``g = logsigmoid(logits) * GATE_LOGIT_SCALE``. With zero-initialised logits every head
starts keeping half its state per token and learns longer memories where they pay.
GLA scales by 1/16 (a ~16-token start); on MQAR the short start formed the recall
circuit sooner in our tiny-model runs (see docs/train.md)."""


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (half-split pairs) at global ``positions`` ``[S_local]``.

    x ``[B, S_local, H, D]``; the rotation is computed in fp32.
    """
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [S, D/2]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class SoftmaxAttention(nn.Module):
    """Causal multi-head (GQA) softmax attention with RoPE."""

    def __init__(self, cfg: ModelConfig, plan: SequenceParallel):
        super().__init__()
        self.cfg, self.plan = cfg, plan
        h, kv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, h * hd, bias=False)
        self.wk = nn.Linear(cfg.d_model, kv * hd, bias=False)
        self.wv = nn.Linear(cfg.d_model, kv * hd, bias=False)
        self.wo = nn.Linear(h * hd, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        hd = self.cfg.head_dim
        q = self.wq(x).view(B, S, -1, hd)
        k = self.wk(x).view(B, S, -1, hd)
        v = self.wv(x).view(B, S, -1, hd)
        q = apply_rope(q, positions, self.cfg.rope_theta)
        k = apply_rope(k, positions, self.cfg.rope_theta)
        return self.wo(softmax_attention(q, k, v, self.plan).reshape(B, S, -1))


class LinearAttention(nn.Module):
    """Causal linear attention with per-head scalar decay, then per-head RMSNorm.

    No positional encoding: the causal recurrence orders tokens by itself.
    """

    def __init__(self, cfg: ModelConfig, plan: SequenceParallel):
        super().__init__()
        self.cfg, self.plan = cfg, plan
        h, hd = cfg.n_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, h * hd, bias=False)
        self.wk = nn.Linear(cfg.d_model, h * hd, bias=False)
        self.wv = nn.Linear(cfg.d_model, h * hd, bias=False)
        self.wo = nn.Linear(h * hd, cfg.d_model, bias=False)
        self.head_norm = nn.RMSNorm(hd, eps=cfg.norm_eps)
        self.gate = nn.Linear(cfg.d_model, h, bias=True) if cfg.linear_decay == "gated" else None

    def constant_decay(self, device: torch.device) -> torch.Tensor:
        """RetNet's fixed per-head log-decay ``log(1 - 2^(-5 - h))``, ``[H]`` (not learned)."""
        h = torch.arange(self.cfg.n_heads, device=device, dtype=torch.float32)
        return torch.log1p(-torch.exp2(-5.0 - h))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        hd = self.cfg.head_dim
        q = self.wq(x).view(B, S, -1, hd)
        k = self.wk(x).view(B, S, -1, hd)
        v = self.wv(x).view(B, S, -1, hd)
        g = g_gamma = None
        if self.gate is not None:
            # The decay chain is a running sum over the whole sequence: keep it fp32.
            g = F.logsigmoid(self.gate(x).float()) * GATE_LOGIT_SCALE  # [B, S, H]
        elif self.cfg.linear_decay == "constant":
            g_gamma = self.constant_decay(x.device)
        o = linear_attention(q, k, v, self.plan, g=g, g_gamma=g_gamma)
        return self.wo(self.head_norm(o).reshape(B, S, -1))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``."""

    def __init__(self, cfg: ModelConfig, kind: str, plan: SequenceParallel):
        super().__init__()
        self.kind = kind
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = SoftmaxAttention(cfg, plan) if kind == "S" else LinearAttention(cfg, plan)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions)
        return x + self.ffn(self.ffn_norm(x))


class LossOutput(NamedTuple):
    """Sums over this rank's scored tokens (divide after reducing over ranks)."""

    loss_sum: torch.Tensor
    """Summed cross-entropy (differentiable), fp32 scalar."""
    correct: torch.Tensor
    """Scored tokens whose argmax prediction is the label, int64 scalar."""
    count: torch.Tensor
    """Scored tokens, int64 scalar."""


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(hidden, weight).float()
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    correct = ((logits.argmax(-1) == labels) & (labels != IGNORE)).sum()
    return loss, correct


class LinearLlama(nn.Module):
    """The whole model. ``forward(tokens [B, S_local], positions [S_local])`` -> hidden
    ``[B, S_local, d_model]``, or with ``labels`` the :class:`LossOutput` of this shard."""

    def __init__(self, cfg: ModelConfig, plan: SequenceParallel | None = None, *, activation_checkpoint: bool = False,
                 loss_chunk_tokens: int = 8192):
        super().__init__()
        plan = plan or SequenceParallel()
        self.cfg, self.activation_checkpoint, self.loss_chunk_tokens = cfg, activation_checkpoint, loss_chunk_tokens
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, kind, plan) for kind in cfg.pattern)
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Llama-style init: N(0, 0.02) matrices, residual outputs scaled by 1/sqrt(2 L)."""
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            std = residual_std if name.endswith(("wo.weight", "w2.weight")) else 0.02
            nn.init.trunc_normal_(p, std=std, a=-3 * std, b=3 * std)
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.output.weight, std=self.cfg.d_model**-0.5)
        for layer in self.layers:
            gate = getattr(layer.attn, "gate", None)
            if gate is not None:
                nn.init.zeros_(gate.bias)

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            if self.activation_checkpoint and torch.is_grad_enabled():
                x = checkpoint(layer, x, positions, use_reentrant=False)
            else:
                x = layer(x, positions)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor | LossOutput:
        h = self.hidden(tokens, positions)
        if labels is None:
            return self.output(h)
        h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
        if labels.numel() <= self.loss_chunk_tokens:
            loss, correct = _chunk_loss(h, self.output.weight, labels)
        else:
            loss, correct = h.new_zeros((), dtype=torch.float32), labels.new_zeros(())
            for start in range(0, labels.numel(), self.loss_chunk_tokens):
                sl = slice(start, start + self.loss_chunk_tokens)
                chunk_loss, chunk_correct = checkpoint(_chunk_loss, h[sl], self.output.weight, labels[sl],
                                                       use_reentrant=False)
                loss, correct = loss + chunk_loss, correct + chunk_correct
        return LossOutput(loss, correct, (labels != IGNORE).sum())
