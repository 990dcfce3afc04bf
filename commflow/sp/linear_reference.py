"""Plain single-process linear attention: the ground truth for the chunked kernels and LASP-2.

Two independent formulations of the same model, both differentiable through
autograd and meant for small sizes (tests, gradcheck in float64):

* :func:`linear_attention_naive` builds the full ``[S, S]`` decay-weighted score
  matrix (quadratic in the sequence);
* :func:`linear_attention_recurrent` runs the token-by-token state recurrence
  (what the model *is*; linear in the sequence, one Python step per token).

The model (Simple GLA / RetNet / Lightning / Mamba-2 style scalar decay), per batch
row and head, with ``G_t = sum_{u <= t} g_u`` (log decay, ``g <= 0``)::

    S_t = exp(g_t) S_{t-1} + k_t v_t^T          state, [D_k, D_v]
    o_t = scale * q_t^T S_t
        = scale * sum_{s <= t} exp(G_t - G_s) (q_t . k_s) v_s      (+ exp(G_t) q_t^T S_0)

Decay modes: none (``g = 0``), constant per head ``g_gamma`` ``[H]`` (``g_t = gamma``),
data-dependent ``g`` ``[B, S, H]``. Non-causal attention (no decay):
``o_t = scale * q_t^T sum_s k_s v_s^T``.

Layout: ``q, k`` ``[B, S, H, D_k]``, ``v`` ``[B, S, H, D_v]``, states ``[B, H, D_k, D_v]``.
"""

from __future__ import annotations

import torch

__all__ = ["decay_log_cumsum", "linear_attention_naive", "linear_attention_recurrent"]


def decay_log_cumsum(
    batch: int, seq: int, heads: int, *, g: torch.Tensor | None, g_gamma: torch.Tensor | None, device, dtype
) -> torch.Tensor | None:
    """``G`` ``[B, S, H]``: inclusive cumulative log decay, or None without decay."""
    if g is not None:
        return torch.cumsum(g.to(dtype), dim=1)
    if g_gamma is not None:
        steps = torch.arange(1, seq + 1, device=device, dtype=dtype)
        return (steps[:, None] * g_gamma.to(dtype)[None, :]).expand(batch, seq, heads)
    return None


def linear_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quadratic form. Returns ``(o [B, S, H, D_v], final_state [B, H, D_k, D_v] or None)``.

    Computes in float64 when the inputs are float64 and in float32 otherwise; ``o``
    comes back in ``q.dtype``, the final state in the compute dtype. The final state is
    returned for causal attention only.
    """
    B, S, H, Dk = q.shape
    scale = Dk**-0.5 if scale is None else scale
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    if not causal:
        if g is not None or g_gamma is not None:
            raise ValueError("non-causal linear attention has no decay: pass g=None and g_gamma=None")
        state = torch.einsum("bshk,bshv->bhkv", kc, vc)
        return (scale * torch.einsum("bshk,bhkv->bshv", qc, state)).to(q.dtype), None
    G = decay_log_cumsum(B, S, H, g=g, g_gamma=g_gamma, device=q.device, dtype=cdt)
    scores = torch.einsum("bthk,bshk->bhts", qc, kc)
    causal_mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    if G is None:
        weights = scores.masked_fill(~causal_mask, 0.0)
    else:
        Gh = G.transpose(1, 2)  # [B, H, S]
        # exp only where s <= t: G_t - G_s <= 0 there, while the masked half could overflow.
        log_decay = (Gh[..., :, None] - Gh[..., None, :]).masked_fill(~causal_mask, float("-inf"))
        weights = scores * torch.exp(log_decay)
    o = torch.einsum("bhts,bshv->bthv", weights, vc)
    k_to_end = kc if G is None else kc * torch.exp(G[:, -1:, :] - G)[..., None]
    final = torch.einsum("bshk,bshv->bhkv", k_to_end, vc)
    if initial_state is not None:
        s0 = initial_state.to(cdt)
        q_decayed = qc if G is None else qc * torch.exp(G)[..., None]
        o = o + torch.einsum("bthk,bhkv->bthv", q_decayed, s0)
        total = 1.0 if G is None else torch.exp(G[:, -1, :])[..., None, None]
        final = final + total * s0
    return (scale * o).to(q.dtype), final


def linear_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal token-by-token recurrence. Returns ``(o, final_state)`` like the naive form."""
    B, S, H, Dk = q.shape
    Dv = v.shape[-1]
    scale = Dk**-0.5 if scale is None else scale
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    state = torch.zeros(B, H, Dk, Dv, dtype=cdt, device=q.device)
    if initial_state is not None:
        state = state + initial_state.to(cdt)
    outs = []
    for t in range(S):
        if g is not None:
            state = state * torch.exp(g[:, t].to(cdt))[..., None, None]
        elif g_gamma is not None:
            state = state * torch.exp(g_gamma.to(cdt))[None, :, None, None]
        state = state + k[:, t].to(cdt)[..., :, None] * v[:, t].to(cdt)[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].to(cdt), state))
    return (scale * torch.stack(outs, dim=1)).to(q.dtype), state
