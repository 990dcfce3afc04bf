"""``commflow net compare`` / ``commflow net plan`` end to end."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from commflow.cli import app


def test_compare_prints_table_and_writes_png_and_json(tmp_path):
    png, js = tmp_path / "c.png", tmp_path / "c.json"
    r = CliRunner().invoke(app, ["net", "compare", "--topology", "leaf_spine:leaves=4,spines=4,hosts_per_leaf=4",
                                 "--collective", "allgather", "--hosts", "rr", "--size", "16MiB", "--lp",
                                 "--png", str(png), "--json", str(js)])
    assert r.exit_code == 0, r.output
    assert "planned" in r.output and "LP bound" in r.output
    assert png.stat().st_size > 10_000
    doc = json.loads(js.read_text())
    by = {row["policy"]: row for row in doc["rows"]}
    # Round-robin ring on 4x4x4: 4 cross-leaf flows per leaf on 4 spines -> planned = spray = LP = 1.
    assert abs(by["planned"]["max_congestion"] - 1.0) < 1e-9 and abs(doc["lp"]["max_congestion"] - 1.0) < 1e-6
    assert by["ecmp"]["max_congestion"] >= 1.0


def test_plan_writes_assignment_and_reports_bad_input(tmp_path):
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(app, ["net", "plan", "--topology", "dual_plane:segments=2,servers_per_segment=1,"
                                 "spines_per_plane=2,gpus_per_server=2", "--collective", "allreduce",
                                 "--hosts", "all", "--size", "1MiB", "--splits", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["splits"] == 2 and all(a["path"][0] == a["src"] for a in doc["assignments"])
    bad = CliRunner().invoke(app, ["net", "plan", "--topology", "torus:n=4"])
    assert bad.exit_code == 2 and "neither a .yaml/.json file" in bad.output


def test_compare_runs_several_jobs_from_a_traffic_file(tmp_path):
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("- {op: allreduce, algorithm: ring, hosts: 0-7, size: 8MiB, name: a}\n"
                    "- {op: alltoall, algorithm: direct, hosts: 8-15, size: 8MiB, name: b}\n")
    js = tmp_path / "c.json"
    r = CliRunner().invoke(app, ["net", "compare", "--topology", "fat_tree:k=4", "--traffic", str(jobs),
                                 "--policies", "spray,planned", "--png", str(tmp_path / "c.png"), "--json", str(js)])
    assert r.exit_code == 0, r.output
    assert "2 job(s)" in r.output
    assert {row["policy"] for row in json.loads(js.read_text())["rows"]} == {"spray", "planned"}
