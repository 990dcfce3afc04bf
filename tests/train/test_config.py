"""Configuration: presets, validation (bad configs refused before spawning), the CLI mapping."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from typer.testing import CliRunner

import commflow.train.cli as train_cli
from commflow.cli import app as commflow_app
from commflow.train.config import (
    PRESETS,
    TrainConfig,
    default_world_size,
    field_docs,
    resolve_layout,
    resolve_model,
    validate,
)
from commflow.train.model import LinearLlama


def cfg(**flat) -> TrainConfig:
    return TrainConfig.from_flat(**flat)


@pytest.mark.parametrize(
    ("flat", "world", "needle"),
    [
        ({"sp": 3}, 4, "--sp (3) must divide the world size (4)"),
        ({"dp": 3, "sp": 2}, 4, "--dp x --sp (3 x 2 = 6) must equal the world size (4)"),
        ({"seq_len": 130, "sp": 4, "layout": "contiguous"}, 4, "--seq-len (130) must be divisible by sp (4)"),
        ({"seq_len": 130, "sp": 2, "pattern": "S", "softmax_sp": "ring", "layout": "zigzag"}, 4,
         "--seq-len (130) must be divisible by 2 x sp (4)"),
        ({"preset": "7b"}, 4, "--preset must be one of tiny, small, 350m, 1b; got '7b'"),
        ({"pattern": "LLXS"}, 4, "--pattern must be a non-empty string of 'L'"),
        ({"pattern": ""}, 4, "--pattern must be a non-empty string"),
        ({"pattern": "LLS"}, 4, "--layers (2) must be a multiple of the pattern length"),
        ({"data": "/nonexistent/file.txt"}, 4, "--data '/nonexistent/file.txt': no such file"),
        ({"batch": 1}, 4, "--batch (1) must be >= dp (2)"),
        ({"sp": 2}, 1, "--sp (2) must divide the world size (1)"),
        ({"layout": "ring"}, 4, "--layout must be one of auto, contiguous, zigzag; got 'ring'"),
        ({"seq_len": 34, "sp": 2}, 4, "--seq-len (34) must be divisible by 2 x sp (4) for layout 'zigzag'"),
        ({"pattern": "S", "softmax_sp": "ulysses", "sp": 8}, 8, "heads (4) must be divisible by sp (8)"),
        ({"softmax_sp": "flash"}, 4, "--softmax-sp must be one of allgather, ulysses, ring; got 'flash'"),
        ({"dp_mode": "zero3"}, 4, "--dp-mode must be one of ddp, fsdp"),
        ({"seq_len": 16, "mqar_pairs": 8}, 4, "--seq-len (16) must be >= 4 x --mqar-pairs (32)"),
        ({"mqar_vocab": 16, "mqar_pairs": 8}, 4, "--mqar-vocab (16) is too small for 8 distinct keys"),
        ({"resume": True}, 4, "--resume needs --out DIR"),
        ({"steps": 0}, 4, "--steps must be > 0; got 0"),
        ({"linear_decay": "exp"}, 4, "--linear-decay must be one of none, constant, gated"),
    ],
)
def test_bad_config_is_refused_with_a_message_naming_the_flag(flat, world, needle):
    with pytest.raises(ValueError) as err:
        validate(cfg(**flat), world)
    assert needle in str(err.value)


def test_default_config_is_valid_on_a_2x2_mesh():
    c = TrainConfig()
    assert default_world_size(c) == 4
    model = validate(c, 4)
    assert model.pattern == "LS" and model.vocab_size == c.data.mqar_vocab
    assert resolve_layout(c, model.pattern) == "zigzag"  # softmax layers: balanced
    assert resolve_layout(c, "L") == "contiguous"  # nothing to balance


def test_sp_defaults_to_what_the_world_fits():
    from commflow.train.config import mesh_shape

    assert [mesh_shape(TrainConfig(), w) for w in (4, 2, 3, 1)] == [(2, 2), (1, 2), (3, 1), (1, 1)]


def test_short_data_file_is_refused(tmp_path):
    f = tmp_path / "small.txt"
    f.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="needs at least 8 x \\(seq_len \\+ 1\\)"):
        validate(cfg(data=f, seq_len=64), 4)


def test_presets_have_linear_llama_shapes_and_counted_parameters():
    for name in PRESETS:
        m = resolve_model(cfg(preset=name), vocab_size=32000)
        with torch.device("meta"):
            model = LinearLlama(m)
        assert sum(p.numel() for p in model.parameters()) == m.num_params(), name
    assert 300e6 < resolve_model(cfg(preset="350m"), vocab_size=32000).num_params() < 450e6
    assert 0.9e9 < resolve_model(cfg(preset="1b"), vocab_size=32000).num_params() < 1.3e9
    tiled = resolve_model(cfg(preset="350m", pattern="LLLS"))
    assert tiled.pattern == "LLLS" * 6 and tiled.n_layers == 24


def test_every_config_field_is_one_documented_flag():
    sig = inspect.signature(train_cli.train)
    fields = [f.name for s in TrainConfig.SECTIONS for f in dataclasses.fields(getattr(TrainConfig(), s))]
    assert sorted(sig.parameters) == sorted(fields)
    for s in TrainConfig.SECTIONS:
        cls = type(getattr(TrainConfig(), s))
        assert set(field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}, cls.__name__


def test_cli_refuses_bad_config_before_spawning(monkeypatch):
    def no_spawn(*args, **kwargs):
        raise AssertionError("spawn must not be reached with a bad configuration")

    monkeypatch.setattr("commflow.dist.spawn", no_spawn)
    monkeypatch.delenv("RANK", raising=False)
    runner = CliRunner()
    for argv, needle in [
        (["train", "--preset", "huge"], "--preset must be one of"),
        (["train", "--sp", "3", "--nproc", "4"], "--sp (3) must divide the world size (4)"),
        (["train", "--data", "missing.bin"], "no such file"),
        (["train", "--pattern", "LQ"], "--pattern must be"),
    ]:
        result = runner.invoke(commflow_app, argv)
        assert result.exit_code == 2, (argv, result.output)
        assert needle in " ".join(result.output.split()), (argv, result.output)
