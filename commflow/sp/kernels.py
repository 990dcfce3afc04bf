"""Local softmax attention that also returns the log-sum-exp, its backward, and the merge.

Sequence-parallel attention splits one softmax over several kernel calls (ring
steps, key segments). Each call returns its partial output ``o_i`` and the
log-sum-exp ``lse_i`` of its scores; :func:`merge_` folds them into running fp32
accumulators. The backward of a call takes the *final* output and log-sum-exp,
which makes its ``dq``/``dk``/``dv`` the exact contribution of that block (the
flash-attention backward recomputes ``P = exp(S - lse)`` and ``rowsum(dO * O)``).

Backends, picked per call by :func:`select_backend`:

``flash``  torch's in-tree FlashAttention-2 (``aten._scaled_dot_product_flash_attention``
           and its ``_backward``); native GQA.
``cudnn``  cuDNN fused attention (``aten._scaled_dot_product_cudnn_attention``);
           what ``F.scaled_dot_product_attention`` runs on H100 in recent torch.
           Key/value heads are repeated for GQA (torch versions differ in native
           support; repeating is always right) and inputs are given in the plain
           ``[B, S, H, D]``-contiguous layout cuDNN is known to handle.
``math``   plain torch in fp32 (fp64 for fp64 input): CPU, fp32 on GPU, and anything
           the fused kernels refuse.

The choice follows torch's own SDPA dispatcher (``torch._fused_sdp_choice``), so a
``torch.nn.attention.sdpa_kernel(...)`` context selects the backend here too, and
each SP strategy runs the same kernel as single-GPU ``F.scaled_dot_product_attention``.

Layout: ``q [B, Lq, Hq, D]``, ``k, v [B, Lk, Hkv, D]`` (the public layout); outputs
``out [B, Lq, Hq, D]`` in ``q.dtype`` and ``lse [B, Hq, Lq]`` contiguous fp32.
``causal=True`` needs ``Lq == Lk`` (a diagonal block); every other mask the SP
strategies need is a full block, so no kernel has to agree on how a non-square
causal mask is aligned (torch's flash aligns it bottom-right, cuDNN top-left).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend

from ._common import autocast_off

__all__ = [
    "BACKENDS",
    "KernelState",
    "attention_backward",
    "attention_forward",
    "local_attention",
    "merge_",
    "select_backend",
]

aten = torch.ops.aten
BACKENDS = ("flash", "cudnn", "math")
# Escape hatch: COMMFLOW_SP_CUDNN_PACKED=0 copies Ulysses' packed q/k/v rows before cuDNN.
_CUDNN_PACKED = os.environ.get("COMMFLOW_SP_CUDNN_PACKED", "1") != "0"


@dataclass
class KernelState:
    """What a backward call needs besides tensors: the backend and its opaque extras
    (RNG state tensors; unused without dropout but required by the op signatures)."""

    backend: str
    extras: tuple = ()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation precision for partial outputs, LSE and gradient sums."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def select_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float) -> str:
    """The backend torch's SDPA dispatcher would pick for these tensors, mapped onto
    ``flash`` / ``cudnn`` / ``math``."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] % 8:
        return "math"  # the raw fused ops want head_dim % 8 == 0 (SDPA pads; we do not)
    # Leaf views that require grad: the dispatcher's backward constraints then apply.
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_(True) for t in (q, k, v))
    try:
        choice = torch._fused_sdp_choice(qt, kt, vt, None, 0.0, causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    except RuntimeError:  # an sdpa_kernel(...) context left no fused kernel for this call
        return "math"
    if choice == int(SDPBackend.FLASH_ATTENTION):
        return "flash"
    if choice == int(SDPBackend.CUDNN_ATTENTION):
        return "cudnn"
    return "math"


def _check_block(q, k, causal):
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"causal kernel calls must be square (a diagonal block), got Lq={q.shape[1]}, Lk={k.shape[1]}"
        )


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _sum_kv_groups(dx: torch.Tensor, hkv: int) -> torch.Tensor:
    b, s, h, d = dx.shape
    if h == hkv:
        return dx
    return dx.view(b, s, hkv, h // hkv, d).sum(3, dtype=acc_dtype(dx.dtype)).to(dx.dtype)


# --- math --------------------------------------------------------------------------------


@autocast_off
def _math_forward(q, k, v, causal, scale):
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    acc = acc_dtype(q.dtype)
    qg = q.to(acc).view(b, lq, hkv, hq // hkv, d)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(acc)) * scale
    if causal:
        future = torch.ones(lq, lq, dtype=torch.bool, device=q.device).triu(1)
        scores.masked_fill_(future, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G, Lq]
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v.to(acc)).reshape(b, lq, hq, d)
    return out.to(q.dtype), lse.reshape(b, hq, lq).to(acc).contiguous()


@autocast_off
def _math_backward(dout, q, k, v, out, lse, causal, scale):
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    acc = acc_dtype(q.dtype)
    qg = q.to(acc).view(b, lq, hkv, g, d)
    kf, vf = k.to(acc), v.to(acc)
    dog = dout.to(acc).view(b, lq, hkv, g, d)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, kf) * scale
    if causal:
        future = torch.ones(lq, lq, dtype=torch.bool, device=q.device).triu(1)
        scores.masked_fill_(future, float("-inf"))
    probs = torch.exp(scores - lse.to(acc).view(b, hkv, g, lq, 1))
    delta = (dog * out.to(acc).view(b, lq, hkv, g, d)).sum(-1).permute(0, 2, 3, 1)  # [B, Hkv, G, Lq]
    dprobs = torch.einsum("bqhgd,bkhd->bhgqk", dog, vf)
    dscores = probs * (dprobs - delta.unsqueeze(-1))
    dq = torch.einsum("bhgqk,bkhd->bqhgd", dscores, kf).reshape(b, lq, hq, d) * scale
    dk = torch.einsum("bhgqk,bqhgd->bkhd", dscores, qg) * scale
    dv = torch.einsum("bhgqk,bqhgd->bkhd", probs, dog)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --- flash ---------------------------------------------------------------------------------


def _flash_forward(q, k, v, causal, scale):
    out, lse, cum_q, cum_k, _, _, rng, unused, _ = aten._scaled_dot_product_flash_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, False, scale=scale
    )
    return out.transpose(1, 2), lse.contiguous(), (cum_q, cum_k, rng, unused)


def _flash_backward(dout, q, k, v, out, lse, extras, causal, scale):
    cum_q, cum_k, rng, unused = extras
    dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
        dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        out.transpose(1, 2), lse, cum_q, cum_k, q.shape[1], k.shape[1], 0.0, causal, rng, unused,
        scale=scale,
    )
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# --- cuDNN ---------------------------------------------------------------------------------


def _cudnn_layout(x: torch.Tensor, packed: bool = False) -> torch.Tensor:
    """``x [B, L, H, D]`` in a layout cuDNN attention is known to take, copying if needed.

    Accepted without a copy: ``[B, L, H, D]``-contiguous (what models pass),
    ``[B, H, L, D]``-contiguous and, with ``packed``, cuDNN's packed-QKV rows
    ``[1, L, 3, H, D]`` (the buffer Ulysses receives for MHA). torch releases have
    differed in which other strided layouts their cuDNN path handles.
    """
    b, s, h, d = x.shape
    if x.is_contiguous() or x.transpose(1, 2).is_contiguous():
        return x
    if packed and b == 1 and x.stride()[1:] == (3 * h * d, d, 1) and _CUDNN_PACKED:
        return x
    return x.contiguous()


def _is_packed_qkv(q, k, v) -> bool:
    """q, k, v are consecutive head groups of one buffer (Ulysses' receive buffer)."""
    row = q.shape[2] * q.shape[3]
    return (
        q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
        and k.storage_offset() == q.storage_offset() + row
        and v.storage_offset() == k.storage_offset() + row
    )


def _cudnn_inputs(q, k, v):
    groups = q.shape[2] // k.shape[2]
    packed = groups == 1 and _is_packed_qkv(q, k, v)
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    return _cudnn_layout(q, packed), _cudnn_layout(k, packed), _cudnn_layout(v, packed)


def _cudnn_forward(q, k, v, causal, scale):
    q, k, v = _cudnn_inputs(q, k, v)
    out, lse, cum_q, cum_k, _, _, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, causal, False, scale=scale
    )
    if lse.dim() == 4:  # [B, H, Lq, 1]
        lse = lse.squeeze(-1)
    return out.transpose(1, 2), lse.contiguous(), (cum_q, cum_k, seed, offset)


def _cudnn_backward(dout, q, k, v, out, lse, extras, causal, scale):
    cum_q, cum_k, seed, offset = extras
    hkv = k.shape[2]
    q, k, v = _cudnn_inputs(q, k, v)
    # dO in the layout of O (cuDNN reads both with one set of strides in some releases).
    out = _cudnn_layout(out)
    dout = dout if dout.stride() == out.stride() else torch.empty_like(out).copy_(dout)
    dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
        dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
        lse.unsqueeze(-1), seed, offset, None, cum_q, cum_k, q.shape[1], k.shape[1], 0.0, causal,
        scale=scale,
    )
    dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    return dq, _sum_kv_groups(dk, hkv), _sum_kv_groups(dv, hkv)


# --- public --------------------------------------------------------------------------------


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, KernelState]:
    """One block of attention: ``q [B, Lq, Hq, D]`` against ``k, v [B, Lk, Hkv, D]``.

    Returns ``out [B, Lq, Hq, D]`` (``q.dtype``), ``lse [B, Hq, Lq]`` (fp32, fp64 for
    fp64 input; contiguous) and the state its backward needs.
    """
    _check_block(q, k, causal)
    backend = backend or select_backend(q, k, v, causal=causal, scale=scale)
    if backend == "flash":
        out, lse, extras = _flash_forward(q, k, v, causal, scale)
    elif backend == "cudnn":
        out, lse, extras = _cudnn_forward(q, k, v, causal, scale)
    elif backend == "math":
        (out, lse), extras = _math_forward(q, k, v, causal, scale), ()
    else:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return out, lse, KernelState(backend, extras)


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    state: KernelState,
    *,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the *final* ``out [B, Lq, Hq, D]`` and ``lse [B, Hq, Lq]``
    of the rows it touched; ``dq``, ``dk``, ``dv`` in the input dtype, shaped like q, k, v.

    ``state`` comes from any :func:`attention_forward` call of the same backend (the
    op signatures carry RNG tensors that are unused without dropout)."""
    _check_block(q, k, causal)
    lse = lse if lse.is_contiguous() else lse.contiguous()
    if state.backend == "flash":
        return _flash_backward(dout, q, k, v, out, lse, state.extras, causal, scale)
    if state.backend == "cudnn":
        return _cudnn_backward(dout, q, k, v, out, lse, state.extras, causal, scale)
    return _math_backward(dout, q, k, v, out, lse, causal, scale)


def merge_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fold one block's ``(out [B, L, H, D], lse [B, H, L])`` into the accumulators, in place.

    ``out_acc`` and ``lse_acc`` are fp32 (fp64) and may be views (a row range).
    Start them at 0 and ``-inf``: the first block is then copied exactly. The
    update is the sigmoid / log-add-exp form (ring-flash-attention PR 34, also
    torch's context parallel): the block's weight is
    ``sigmoid(lse - lse_acc) = exp(lse - lse_new)``, never an ``exp`` of a positive
    number, and ``lse_new = logaddexp(lse_acc, lse)`` never overflows.
    """
    weight = torch.sigmoid(lse - lse_acc)  # [B, H, L]
    lse_acc.copy_(torch.logaddexp(lse_acc, lse))
    out_acc.lerp_(out.to(out_acc.dtype), weight.transpose(1, 2).unsqueeze(-1))


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        out, lse, state = attention_forward(q, k, v, causal=causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.state, ctx.causal, ctx.scale = state, causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, ctx.state, causal=ctx.causal, scale=ctx.scale)
        return dq, dk, dv, None, None


def local_attention(q, k, v, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Single-process attention through the same kernels (autograd-aware).

    ``q [B, S, Hq, D]``, ``k, v [B, S, Hkv, D]`` -> ``[B, S, Hq, D]``. This is what
    every SP strategy computes at group size 1, bit for bit.
    """
    from ._common import default_scale

    return _LocalAttention.apply(q, k, v, causal, default_scale(q.shape[-1], scale))
