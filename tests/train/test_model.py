"""The model's single-process pieces against plain recurrences and unchunked forms."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from commflow.train.attention import local_linear_attention
from commflow.train.config import TrainConfig, resolve_model
from commflow.train.data import IGNORE
from commflow.train.model import LinearLlama, apply_rope

FP32_TOL = 1e-5  # fp32, short sequences: only summation order differs


def recurrent_linear_attention(q, k, v, g):
    """``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = q_t S_t / sqrt(D)``, one token at a time."""
    B, S, H, D = q.shape
    state = torch.zeros(B, H, D, D, dtype=torch.float64)
    out = []
    for t in range(S):
        state = state * g[:, t, :, None, None].exp() + torch.einsum("bhd,bhe->bhde", k[:, t], v[:, t])
        out.append(torch.einsum("bhd,bhde->bhe", q[:, t], state) * D**-0.5)
    return torch.stack(out, 1)


@pytest.mark.parametrize("decay", ["none", "constant", "gated"])
def test_local_linear_attention_equals_the_recurrence(decay):
    torch.manual_seed(0)
    B, S, H, D = 2, 19, 3, 8
    q, k, v = (torch.randn(B, S, H, D, dtype=torch.float64) for _ in range(3))
    g = torch.zeros(B, S, H, dtype=torch.float64)
    kwargs = {}
    if decay == "gated":
        g = F.logsigmoid(torch.randn(B, S, H, dtype=torch.float64))
        kwargs["g"] = g
    elif decay == "constant":
        gamma = torch.tensor([-0.1, -0.5, -0.01], dtype=torch.float64)
        g = gamma.expand(B, S, H)
        kwargs["g_gamma"] = gamma
    out = local_linear_attention(q, k, v, **kwargs).double()
    torch.testing.assert_close(out, recurrent_linear_attention(q, k, v, g), atol=FP32_TOL, rtol=FP32_TOL)


def test_rope_scores_depend_only_on_the_position_difference():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i, j):
        return (apply_rope(q, torch.tensor([i]), 10_000.0) * apply_rope(k, torch.tensor([j]), 10_000.0)).sum()

    torch.testing.assert_close(score(3, 1), score(103, 101), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)


def _tiny(pattern: str, decay: str = "gated"):
    c = TrainConfig.from_flat(pattern=pattern, layers=len(pattern), linear_decay=decay)
    return dataclasses.replace(resolve_model(c, vocab_size=32), d_model=32, n_heads=2, n_kv_heads=1)


@pytest.mark.parametrize("decay", ["none", "constant", "gated"])
def test_chunked_loss_equals_the_whole_logits_loss(decay):
    torch.manual_seed(0)
    model = LinearLlama(_tiny("LS", decay), loss_chunk_tokens=7)  # 3 x 12 tokens -> 6 chunks, the last short
    tokens = torch.randint(0, 32, (3, 12))
    labels = torch.randint(0, 32, (3, 12))
    labels[:, ::3] = IGNORE
    pos = torch.arange(12)
    out = model(tokens, pos, labels)
    out.loss_sum.backward()
    chunked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(tokens, pos)
    whole = F.cross_entropy(logits.reshape(-1, 32), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    whole.backward()
    torch.testing.assert_close(out.loss_sum, whole, atol=FP32_TOL, rtol=FP32_TOL)
    assert out.count == (labels != IGNORE).sum()
    assert out.correct == ((logits.argmax(-1) == labels) & (labels != IGNORE)).sum()
    for a, p in zip(chunked, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=FP32_TOL, rtol=1e-4)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = _tiny("LLLS")
    plain, ckpt = LinearLlama(cfg), LinearLlama(cfg, activation_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    tokens, pos = torch.randint(0, 32, (2, 10)), torch.arange(10)
    for m in (plain, ckpt):
        m(tokens, pos, tokens).loss_sum.backward()
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=FP32_TOL, rtol=1e-4)


def test_softmax_layer_is_causal():
    torch.manual_seed(0)
    model = LinearLlama(_tiny("SL"))
    tokens, pos = torch.randint(0, 32, (1, 10)), torch.arange(10)
    changed = tokens.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 32
    a, b = model(tokens, pos), model(changed, pos)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])
