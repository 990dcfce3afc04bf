"""Typed configuration of a training job, model presets, and up-front validation.

A job is one :class:`TrainConfig` made of sections (model, data, parallel, optim,
checkpoint, log). Field names are unique across sections, and the ``commflow train``
command has exactly one flag per field (``--seq-len`` for ``data.seq_len``), built
from these dataclasses with the field docstrings as help, so the two never drift.

:func:`validate` checks everything that can be known before a process starts
(mesh against world size, divisibility, preset, pattern, data file) and raises a
``ValueError`` naming the flag, the value and the rule. The CLI calls it before
spawning; every worker calls it again before its first collective, so a bad
configuration under torchrun fails on every rank instead of hanging one.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "PRESETS",
    "CheckpointConfig",
    "DataConfig",
    "LogConfig",
    "ModelConfig",
    "ModelOptions",
    "OptimConfig",
    "ParallelConfig",
    "TrainConfig",
    "field_docs",
    "resolve_layout",
    "resolve_model",
    "validate",
]

SOFTMAX_SP = ("allgather", "ulysses", "ring")
LINEAR_DECAYS = ("none", "constant", "gated")
DP_MODES = ("ddp", "fsdp")
LAYOUT_CHOICES = ("auto", "contiguous", "zigzag")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16")


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    """The architecture of a Linear-Llama model, fully resolved (what model.py builds)."""

    d_model: int
    """Width of the residual stream."""
    n_layers: int
    """Number of blocks."""
    n_heads: int
    """Query heads; head_dim = d_model / n_heads."""
    n_kv_heads: int
    """Key/value heads of the softmax layers (GQA when < n_heads). Linear layers use n_heads."""
    ffn_hidden: int
    """Hidden width of the SwiGLU feed-forward."""
    pattern: str
    """One letter per layer: 'L' linear attention (LASP-2), 'S' softmax attention."""
    vocab_size: int = 256
    """Embedding rows; set by the data (MQAR vocabulary, 256 for bytes)."""
    linear_decay: str = "gated"
    """Forgetting in linear layers: 'none' (plain linear attention, the LASP-2 paper's
    basic Linear-Llama), 'constant' (per-head decay, RetNet/Lightning) or 'gated'
    (data-dependent scalar gate per head and token, Simple GLA / Mamba-2)."""
    rope_theta: float = 500_000.0
    """RoPE base of the softmax layers (Llama 3's by default; presets set their own)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def num_params(self, *, embeddings: bool = True) -> int:
        """Parameter count, computed from the shapes (equals sum(p.numel()) of the model)."""
        d, h, hd, f = self.d_model, self.n_heads, self.head_dim, self.ffn_hidden
        total = 0
        for kind in self.pattern:
            if kind == "S":
                attn = d * h * hd + 2 * d * self.n_kv_heads * hd + h * hd * d
            else:
                attn = 4 * d * h * hd + hd  # q, k, v, o and the per-head output norm
                if self.linear_decay == "gated":
                    attn += d * h + h  # gate projection and bias (the constant decay is not learned)
            total += attn + 3 * d * f + 2 * d  # attention, SwiGLU, two RMSNorms
        total += d  # final norm
        if embeddings:
            total += 2 * self.vocab_size * d  # untied embedding and output head
        return total


@dataclass(kw_only=True, frozen=True)
class _Preset:
    shape: ModelConfig
    lr: float
    """A learning rate known to work at this size (the --lr default)."""


def _preset(d: int, layers: int, heads: int, kv_heads: int, ffn: int, *, pattern: str = "LLLS", lr: float,
            theta: float) -> _Preset:
    return _Preset(shape=ModelConfig(d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                                     ffn_hidden=ffn, pattern=pattern, rope_theta=theta), lr=lr)


# Linear-Llama shapes (Llama blocks, SwiGLU at ~8/3 d rounded to a multiple of 64).
# tiny: the smallest hybrid, one LASP-2 layer then one softmax layer, sized so that the
# CPU demo learns MQAR in minutes on 2 cores; the others use LASP-2H's 3:1 "LLLS".
# 350m: a Llama-style 24 x 1024 stack (~310M without embeddings, ~375M at vocab 32K);
# 1b: Llama-3.2-1B's shapes (16 x 2048, 32 heads, 8 KV heads, FFN 8192), the size of the
# LASP-2 paper's Linear-Llama3-1B. RoPE base: Llama 3's 500K for the long-context sizes;
# 10K for the small ones, whose 16-64-dim heads would otherwise rotate too slowly to
# tell neighbouring tokens apart.
PRESETS: dict[str, _Preset] = {
    "tiny": _preset(64, 2, 4, 4, 192, pattern="LS", lr=3e-3, theta=10_000.0),
    "small": _preset(256, 8, 4, 4, 704, lr=1e-3, theta=10_000.0),
    "350m": _preset(1024, 24, 8, 8, 2816, lr=3e-4, theta=500_000.0),
    "1b": _preset(2048, 16, 32, 8, 8192, lr=2e-4, theta=500_000.0),
}


@dataclass(kw_only=True)
class ModelOptions:
    preset: str = "tiny"
    """Model size: tiny (CPU), small, 350m or 1b (Linear-Llama shapes)."""
    pattern: str | None = None
    """Layer kinds, 'L' linear (LASP-2) / 'S' softmax, tiled over the layers: 'LLLS' is
    LASP-2H's 3:1 hybrid, 'S' pure softmax, 'L' pure linear. Default: the preset's
    ('LS' for tiny, 'LLLS' for the others)."""
    layers: int | None = None
    """Number of layers (default: the preset's); a multiple of the pattern's length."""
    linear_decay: str = "gated"
    """Linear-layer forgetting: none | constant | gated (see ModelConfig)."""
    dtype: str = "float32"
    """Compute dtype: float32, or bfloat16 autocast (GPU); parameters stay fp32."""


@dataclass(kw_only=True)
class DataConfig:
    data: Path | None = None
    """Byte-level text file (any file: vocab 256) or .npy token file; default: MQAR generated on the fly."""
    seq_len: int = 32
    """Global sequence length in tokens (split across the sp ranks)."""
    batch: int = 32
    """Global batch in sequences, split across the dp ranks (as evenly as it goes)."""
    mqar_pairs: int = 8
    """MQAR: key-value pairs per sequence (each is queried once)."""
    mqar_vocab: int = 64
    """MQAR: vocabulary (keys from the lower half, values from the upper half)."""
    seed: int = 0
    """Seed of the initial weights and of the data streams."""


@dataclass(kw_only=True)
class ParallelConfig:
    nproc: int | None = None
    """Local processes to spawn (default dp x sp, or 4); ignored under torchrun."""
    dp: int | None = None
    """Data-parallel degree (default: world size / sp)."""
    sp: int | None = None
    """Sequence-parallel degree: each sequence is split across this many ranks (default: 2
    when the world size is even, else 1, so a restart on fewer ranks still fits)."""
    softmax_sp: str = "allgather"
    """Softmax layers under SP: allgather (LASP-2H), ulysses or ring. Linear layers use LASP-2."""
    layout: str = "auto"
    """Sequence layout of the whole model: contiguous, zigzag, or auto (zigzag when there are
    softmax layers, to balance causal attention; contiguous for pure linear models)."""
    dp_mode: str = "ddp"
    """Gradient sync over the dp x sp ranks: ddp (DistributedDataParallel) or fsdp (FSDP2 fully_shard)."""
    device: str = "auto"
    """cpu, cuda or auto (cuda when available)."""
    activation_checkpoint: bool = False
    """Recompute each block in the backward (long contexts)."""


@dataclass(kw_only=True)
class OptimConfig:
    steps: int = 1200
    """Optimizer steps to train for (in total, counting steps before a resume)."""
    lr: float | None = None
    """Peak AdamW learning rate (default: the preset's)."""
    warmup: int = 20
    """Linear warm-up steps; cosine decay to 10% of the peak after."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only; norms, gains and decays are exempt)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""


@dataclass(kw_only=True)
class CheckpointConfig:
    ckpt_every: int = 100
    """Write a checkpoint every this many steps, and at the end (0 = never)."""
    keep: int = 2
    """Checkpoints to keep (oldest removed first)."""
    resume: bool = False
    """Continue from the newest complete checkpoint in OUT/checkpoints (needs --out)."""


@dataclass(kw_only=True)
class LogConfig:
    out: Path | None = None
    """Run folder for metrics.jsonl and checkpoints/ (default: a fresh folder under ./runs/)."""
    log_every: int = 5
    """Write a metrics line (and print one) every this many steps."""
    eval_every: int = 100
    """Measure held-out accuracy every this many steps, and at the end (0 = only at the end)."""
    eval_batches: int = 4
    """Held-out batches (of --batch sequences) per evaluation (0 = no evaluation)."""
    progress: bool = True
    """Show a live progress bar (rank 0)."""


@dataclass(kw_only=True)
class TrainConfig:
    """One training job; the sections map one to one onto `commflow train` flags."""

    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    SECTIONS = ("model", "data", "parallel", "optim", "checkpoint", "log")

    def to_dict(self) -> dict:
        """JSON-ready nested dict (Paths as strings)."""
        return {s: {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(getattr(self, s)).items()}
                for s in self.SECTIONS}

    @classmethod
    def from_flat(cls, **flat) -> TrainConfig:
        """Build from flag-style keyword arguments (``seq_len=64, sp=2``); unknown keys raise."""
        cfg = cls()
        for section in cls.SECTIONS:
            sub = getattr(cfg, section)
            for f in dataclasses.fields(sub):
                if f.name in flat:
                    setattr(sub, f.name, flat.pop(f.name))
        if flat:
            raise ValueError(f"unknown config fields {sorted(flat)}")
        return cfg


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (for CLI help)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


# --- resolution and validation -------------------------------------------------


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}; got {value!r}")


def _positive(name: str, value: int | float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        rule = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"--{name.replace('_', '-')} must be {rule}; got {value}")


def data_vocab(cfg: TrainConfig) -> int:
    """Vocabulary implied by the data: MQAR's, 256 for bytes, max token + 1 for .npy."""
    path = cfg.data.data
    if path is None:
        return cfg.data.mqar_vocab
    if Path(path).suffix == ".npy":
        import numpy as np

        return int(np.load(path, mmap_mode="r").max()) + 1
    return 256


def resolve_model(cfg: TrainConfig, vocab_size: int | None = None) -> ModelConfig:
    """The preset with the job's overrides applied; raises on an unknown preset or bad pattern."""
    opts = cfg.model
    if opts.preset not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}; got {opts.preset!r}")
    base = PRESETS[opts.preset].shape
    pattern = base.pattern if opts.pattern is None else opts.pattern
    if not pattern or set(pattern) - {"L", "S"}:
        raise ValueError(
            f"--pattern must be a non-empty string of 'L' (linear) and 'S' (softmax) layers, e.g. 'LLLS'; got {pattern!r}"
        )
    layers = base.n_layers if opts.layers is None else opts.layers
    _positive("layers", layers)
    if layers % len(pattern):
        raise ValueError(f"--layers ({layers}) must be a multiple of the pattern length ({pattern!r} has {len(pattern)})")
    _choice("linear_decay", opts.linear_decay, LINEAR_DECAYS)
    return dataclasses.replace(
        base,
        n_layers=layers,
        pattern=pattern * (layers // len(pattern)),
        vocab_size=data_vocab(cfg) if vocab_size is None else vocab_size,
        linear_decay=opts.linear_decay,
    )


def resolve_layout(cfg: TrainConfig, pattern: str) -> str:
    """The one shard layout of the whole model (see docs/train.md, "Parallel layout")."""
    layout = cfg.parallel.layout
    _choice("layout", layout, LAYOUT_CHOICES)
    if layout == "auto":
        # Causal softmax on contiguous shards is unbalanced (the last rank's queries see
        # the most keys); zigzag balances it, and LASP-2 and every softmax strategy take
        # it (LASP-2 then gathers two states per rank instead of one). A pure linear
        # model has nothing to balance.
        return "zigzag" if "S" in pattern else "contiguous"
    return layout


def mesh_shape(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(dp, sp) for a world of ``world_size`` ranks; raises if the mesh does not fit."""
    sp = cfg.parallel.sp
    if sp is None:
        sp = 2 if world_size % 2 == 0 else 1
    _positive("sp", sp)
    if world_size % sp:
        raise ValueError(f"--sp ({sp}) must divide the world size ({world_size})")
    dp = world_size // sp if cfg.parallel.dp is None else cfg.parallel.dp
    _positive("dp", dp)
    if dp * sp != world_size:
        raise ValueError(f"--dp x --sp ({dp} x {sp} = {dp * sp}) must equal the world size ({world_size})")
    return dp, sp


def default_world_size(cfg: TrainConfig) -> int:
    """Processes `commflow train` spawns: --nproc, else dp x sp, else 4 (a 2 x 2 mesh)."""
    p = cfg.parallel
    if p.nproc is not None:
        return p.nproc
    sp = 2 if p.sp is None else p.sp
    if p.dp is not None:
        return p.dp * sp
    return 4 if 4 % sp == 0 else sp


def validate(cfg: TrainConfig, world_size: int) -> ModelConfig:
    """Check the whole job for ``world_size`` ranks; return the resolved model.

    Pure and deterministic (reads only the config and the data file's size), so every
    rank reaches the same verdict before any collective.
    """
    p, d, o, c, lg = cfg.parallel, cfg.data, cfg.optim, cfg.checkpoint, cfg.log
    _choice("softmax_sp", p.softmax_sp, SOFTMAX_SP)
    _choice("dp_mode", p.dp_mode, DP_MODES)
    _choice("device", p.device, DEVICES)
    _choice("dtype", cfg.model.dtype, DTYPES)
    if p.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is available (torch.cuda.is_available() is False)")
    dp, sp = mesh_shape(cfg, world_size)
    if d.data is not None:
        path = Path(d.data)
        if not path.is_file():
            raise ValueError(f"--data {str(path)!r}: no such file")
    model = resolve_model(cfg)
    layout = resolve_layout(cfg, model.pattern)
    if model.d_model % model.n_heads or model.n_heads % model.n_kv_heads:
        raise ValueError(f"preset {cfg.model.preset!r}: d_model {model.d_model}, heads {model.n_heads} and "
                         f"kv heads {model.n_kv_heads} must divide each other")
    for name in ("seq_len", "batch", "steps"):
        _positive(name, getattr(d, name, None) if name != "steps" else o.steps)
    _positive("warmup", o.warmup, zero_ok=True)
    _positive("ckpt_every", c.ckpt_every, zero_ok=True)
    _positive("keep", c.keep)
    _positive("log_every", lg.log_every)
    _positive("eval_every", lg.eval_every, zero_ok=True)
    _positive("eval_batches", lg.eval_batches, zero_ok=True)
    if o.lr is not None:
        _positive("lr", o.lr)
    if d.batch < dp:
        raise ValueError(f"--batch ({d.batch}) must be >= dp ({dp}): every dp rank needs at least one sequence")
    parts = sp * (2 if layout == "zigzag" else 1)
    if d.seq_len % parts:
        rule = "2 x sp" if layout == "zigzag" else "sp"
        raise ValueError(f"--seq-len ({d.seq_len}) must be divisible by {rule} ({parts}) for layout {layout!r}")
    if p.softmax_sp == "ulysses" and "S" in model.pattern and model.n_heads % sp:
        raise ValueError(f"--softmax-sp ulysses splits heads across sp ranks: heads ({model.n_heads}) "
                         f"must be divisible by sp ({sp})")
    if d.data is None:
        _positive("mqar_pairs", d.mqar_pairs)
        if d.seq_len < 4 * d.mqar_pairs:
            raise ValueError(f"--seq-len ({d.seq_len}) must be >= 4 x --mqar-pairs ({4 * d.mqar_pairs}): "
                             "the pairs take 2 tokens each and the queries need as many slots again")
        if d.mqar_vocab // 2 - 1 < d.mqar_pairs:
            raise ValueError(f"--mqar-vocab ({d.mqar_vocab}) is too small for {d.mqar_pairs} distinct keys: "
                             f"need mqar_vocab // 2 - 1 >= mqar_pairs")
    else:
        size = Path(d.data).stat().st_size
        if Path(d.data).suffix == ".npy":
            import numpy as np

            size = int(np.load(d.data, mmap_mode="r").shape[0])
        # The last eighth is held out for evaluation; both parts must hold a sequence + 1.
        if size // 8 < d.seq_len + 1:
            raise ValueError(f"--data {str(d.data)!r} has {size} tokens; with --seq-len {d.seq_len} it needs at "
                             f"least 8 x (seq_len + 1) = {8 * (d.seq_len + 1)} (the last eighth is held out)")
    if c.resume and lg.out is None:
        raise ValueError("--resume needs --out DIR (the run folder whose checkpoints/ to continue from)")
    return model
