"""Result files: the numbers plus everything needed to trust and rerun them."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed
        return None


def environment() -> dict[str, Any]:
    """Device, GPU count, library versions and the git commit of this run."""
    import torch

    cuda = torch.cuda.is_available()
    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "cpu_count": os.cpu_count(),
        "hostname": socket.gethostname(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "triton": _version("triton"),
        "fla": _version("fla-core") or _version("flash-linear-attention"),
        "deepspeed": _version("deepspeed"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    # The device machine's copy of the tree may hold a stale .git (it recorded the
    # session's first commit for runs of later ones), so a commit passed in wins.
    passed = os.environ.get("COMMFLOW_GIT_COMMIT")
    if passed:
        env["git_commit_detected"], env["git_commit"] = env["git_commit"], passed
    return env


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]


def save(name: str, args: dict[str, Any], numbers: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``{benchmark, env, args, results}`` to a new JSON file and return its path."""
    env = environment()
    record = {"benchmark": name, "env": env, "args": args, "results": numbers}
    if out is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        ngpu = f"{env['gpu_count']}x" if env["gpu_count"] else ""
        out = RESULTS_DIR / f"{name}_{ngpu}{_slug(env['device'])}_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    return out


def probe_main(name: str, worker, argv: list[str] | None, doc: str, *, nproc: int,
               options: dict[str, int | str], timeout_s: float, env: dict[str, str]) -> int:
    """The command line of a probe script: ``[--out FILE] [--nproc N]`` and ``options`` (flags
    with their defaults, typed as the defaults); runs ``worker(vars(args))`` on ``N`` local GPU ranks and saves
    rank 0's return value as the results of a ``name`` record in ``FILE`` (default: a new file
    under benchmarks/results/, as every benchmark's)."""
    import argparse

    from commflow.dist import spawn

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", default=None, help="result file (default: a new one under benchmarks/results/)")
    ap.add_argument("--nproc", type=int, default=nproc)
    for flag, default in options.items():
        ap.add_argument(f"--{flag.replace('_', '-')}", type=type(default), default=default)
    args = ap.parse_args(argv)
    res = spawn(worker, args.nproc, vars(args), backend=None, init=False, timeout_s=timeout_s, env=env)[0]
    print(save(name, vars(args), res, Path(args.out) if args.out else None))
    return 0
