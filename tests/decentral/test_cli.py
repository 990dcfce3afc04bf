"""``commflow decentral``: outputs, scenario definitions, and errors before any training."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from commflow.cli import app


def test_compare_writes_jsonl_png_and_a_summary(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "decentral", "--nodes", "30", "--graph", "ba:m=2", "--drop", "0.2", "--drop-kind", "relay", "--at", "3",
        "--rounds", "6", "--compare", "data,relay,none", "--hidden", "8", "--link-fail", "0.1",
        "--link-fail-at", "4", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 6
    for row in rows:
        assert {"scenario", "round", "mean_acc", "min_acc", "components"} <= row.keys()
        assert row["min_acc"] <= row["mean_acc"] <= row["max_acc"]
    by = {(r["scenario"], r["round"]): r for r in rows}
    assert by[("none", 5)]["alive"] == 30 and by[("data", 5)]["alive"] == by[("relay", 5)]["alive"] == 24
    assert by[("none", 3)]["links"] == 2 * 28 and by[("none", 4)]["links"] == 2 * 28 - 6  # 10 % of 56 links fail
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["nodes"] == 30 and run["drop_fraction"] == 0.2
    assert run["scenarios"]["relay"]["relay_nodes"] == sorted(run["scenarios"]["relay"]["dropped"])
    assert "final round 5" in result.output and "relay" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--drop", "1.5"], "fraction=1.5 must be in [0, 1]"),
        (["--at", "7"], "at=7 is beyond the run; rounds are 0..5"),
        (["--compare", "data,crash"], "unknown kind 'crash'"),
        (["--nodes", "10", "--compare", "data", "--graph", "ba:m=20"], "1 <= m < nodes=10"),
        (["--rejoin-at", "2"], "nothing was dropped or failed before it"),
        (["--graph", "file:/no/such/edges.txt"], "does not exist"),
        (["--mixing", "gossip"], "mixing='gossip'"),
        (["--hidden", "a,b"], "hidden='a,b'"),
    ],
)
def test_impossible_requests_fail_with_a_clear_message(tmp_path, args, message):
    result = CliRunner().invoke(app, ["decentral", "--rounds", "6", "--at", "3", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "rounds.jsonl").exists()


def test_a_file_graph_sets_the_node_count(tmp_path):
    edges = tmp_path / "g.txt"
    edges.write_text("".join(f"{i} {(i + 1) % 8}\n" for i in range(8)))
    result = CliRunner().invoke(app, ["decentral", "--graph", f"file:{edges}", "--rounds", "2", "--at", "1",
                                      "--drop-kind", "data:random", "--drop", "0.25", "--hidden", "4",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    last = json.loads((tmp_path / "o" / "rounds.jsonl").read_text().splitlines()[-1])
    assert last["alive"] == 6
