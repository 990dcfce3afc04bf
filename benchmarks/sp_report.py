"""Turn an ``sp_attention`` result file into the markdown tables and the plot of docs/sp.md.

    python -m benchmarks.sp_report benchmarks/results/sp_attention_4xnvidia-h100-..._STAMP.json \\
        --png docs/img/sp_attention.png [--md docs/sp_results.md]

Prints (or writes) markdown: the card, versions and command of the run; TFLOP/s per
GPU with each strategy's fraction of the 1-GPU SDPA limit; fwd+bwd time; peak memory
per GPU; and, if measured, the longest trainable sequence. Every number is read
from the file, none is typed in.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["markdown", "plot", "main"]

LABELS = {
    "sdpa_1gpu": "1-GPU SDPA",
    "sdpa_1gpu_bhsd": "1-GPU SDPA (BHSD)",
    "ulysses": "Ulysses",
    "ring": "ring",
    "allgather": "all-gather KV",
    "deepspeed": "DeepSpeed Ulysses",
    "torch_cp_allgather": "torch CP (allgather)",
    "torch_cp_alltoall": "torch CP (alltoall)",
}
ORDER = list(LABELS)
LIMITS = ("sdpa_1gpu", "sdpa_1gpu_bhsd")


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n < 2**20 else (f"{n / 2**20:g}M" if n >= 2**20 else str(n))


def _label(name: str) -> str:
    body, _, priority = name.partition("@")
    base, _, variant = body.partition(":")
    label = LABELS.get(base, base)
    if variant:
        label += f" ({variant} chunk{'' if variant == '1' else 's'})" if variant.isdigit() else f" ({variant})"
    return label + (" [normal-priority NCCL]" if priority else "")


def _is_variant(name: str) -> bool:
    return ":" in name or "@" in name


def _rows(record: dict) -> dict[tuple[str, int], dict]:
    return {(r["strategy"], r["seq"]): r for r in record["results"]["rows"]}


def _names(rows: dict, seqs: list[int]) -> list[str]:
    present = {n for n, _ in rows}
    key = lambda n: (ORDER.index(n.partition(":")[0]) if n.partition(":")[0] in ORDER else len(ORDER), n)
    return sorted(present, key=key)


def _limit(rows: dict, seq: int) -> float | None:
    """The compute limit at ``seq``: the faster of the 1-GPU SDPA layouts (SDPA's own kernel)."""
    vals = [rows[(n, seq)]["tflops_per_gpu"] for n in LIMITS
            if rows.get((n, seq), {}).get("status") == "ok"]
    return max(vals) if vals else None


def _command(record: dict) -> str:
    from .sp_attention import _arguments

    parser = argparse.ArgumentParser()
    _arguments(parser)
    defaults = vars(parser.parse_args([]))
    parts = ["python -m benchmarks sp_attention"]
    for key, value in record["args"].items():
        always = key in ("device", "nproc")  # what the machine would otherwise pick
        if key in defaults and (always or value != defaults[key]) and value not in (None, False):
            flag = "--" + key.replace("_", "-")
            parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


def markdown(record: dict) -> str:
    env, res = record["env"], record["results"]
    cfg = res["config"]
    rows = _rows(record)
    seqs = sorted({s for _, s in rows})
    every = _names(rows, seqs)
    names = [n for n in every if not _is_variant(n)]
    variants = [n for n in every if _is_variant(n)]
    card = f"{env.get('gpu_count') or cfg['nproc']}x {env['device']}" if env.get("gpu_count") else env["device"]
    out = [
        f"Card: **{card}**, {cfg['nproc']} ranks; torch {env['torch']}, NCCL {env.get('nccl')}, "
        f"commit `{(env.get('git_commit') or 'unknown')[:10]}`, {env.get('date_utc', '')}.",
        f"Problem: B={cfg['batch']}, H={cfg['heads']} (KV {cfg['kv_heads']}), D={cfg['head_dim']}, "
        f"{cfg['dtype']}, {'causal' if cfg['causal'] else 'full'} attention; ring/all-gather shards: "
        f"{cfg['layout']}. FLOPs: {res['flop_convention']}.",
        f"Communication: every strategy on one NCCL group, stream priority "
        f"{cfg.get('nccl_priority', 'normal')}.",
        "",
        f"Command: `{_command(record)}`",
        "",
    ]
    if res.get("skipped"):
        out += ["Not measured: " + "; ".join(f"{_label(n)}: {why}" for n, why in res["skipped"].items()), ""]

    def table(title, fmt, names=names, seqs=seqs):
        lines = [f"**{title}**", "", "| total seq | " + " | ".join(_label(n) for n in names) + " |",
                 "|---" * (len(names) + 1) + "|"]
        for s in seqs:
            cells = []
            for n in names:
                r = rows.get((n, s))
                cells.append("-" if r is None else (r.get("status", "?") if r.get("status") != "ok" else fmt(r, s)))
            lines.append(f"| {_tokens(s)} | " + " | ".join(cells) + " |")
        return lines + [""]

    def tflops(r, s):
        limit = _limit(rows, s)
        ratio = ""
        if r["strategy"] not in LIMITS and limit:
            ratio = f" ({r['tflops_per_gpu'] / limit:.2f})"
        value = r["tflops_per_gpu"]
        return f"{value:.0f}{ratio}" if value >= 100 else f"{value:.3g}{ratio}"

    out += table("TFLOP/s per GPU (fraction of the 1-GPU limit: the faster 1-GPU SDPA column), fwd+bwd", tflops)
    out += table("fwd+bwd time, ms (median, slowest rank)", lambda r, s: f"{r['time_ms']:.1f}")
    if any("peak_allocated_gib" in r for r in rows.values()):
        out += table("peak memory per GPU, GiB (allocated; inputs and grads included)",
                     lambda r, s: f"{r['peak_allocated_gib']:.2f}")
    if variants:
        bases = [n for n in names if any(v.partition("@")[0].partition(":")[0] == n for v in variants)]
        vseqs = [s for s in seqs if any((v, s) in rows for v in variants)]
        out += table("variants (pipeline depth, SDPA kernel, NCCL priority): TFLOP/s per GPU (fraction of the limit)",
                     tflops, names=sorted(bases + variants, key=lambda n: (ORDER.index(n.partition("@")[0].partition(":")[0]), n)),
                     seqs=vseqs)
    if res.get("max_seq"):
        out += ["**longest trainable sequence on these GPUs**", "",
                "| strategy | predicted (linear memory fit) | verified fwd+bwd | GiB per 1K tokens |", "|---|---|---|---|"]
        for m in res["max_seq"]:
            pred = _tokens(m["predicted_seq"]) if m.get("predicted_seq") else m.get("status", "-")
            ver = _tokens(m["verified_seq"]) if m.get("verified_seq") else ("OOM at " + ", ".join(
                _tokens(s) for s in m["oom_at"]) if m.get("oom_at") else "not run")
            per_k = f"{m['gib_per_token'] * 1024:.3f}" if "gib_per_token" in m else "-"
            out.append(f"| {_label(m['strategy'])} | {pred} | {ver} | {per_k} |")
        out.append("")
    return "\n".join(out)


def plot(record: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(record)
    seqs = sorted({s for _, s in rows})
    names = [n for n in _names(rows, seqs) if not _is_variant(n)]
    has_mem = any("peak_allocated_gib" in r for r in rows.values())
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(12 if has_mem else 6.5, 4.2), squeeze=False)
    for n in names:
        pts = [(s, rows[(n, s)]) for s in seqs if rows.get((n, s), {}).get("status") == "ok"]
        if not pts:
            continue
        style = {"marker": "o"}
        if n.startswith("sdpa_1gpu"):
            style = {"linestyle": "--" if n == "sdpa_1gpu" else ":", "color": "black"}
        axes[0][0].plot([s for s, _ in pts], [r["tflops_per_gpu"] for _, r in pts], label=_label(n), **style)
        if has_mem:
            axes[0][1].plot([s for s, _ in pts], [r["peak_allocated_gib"] for _, r in pts], label=_label(n), **style)
    env, cfg = record["env"], record["results"]["config"]
    titles = ["TFLOP/s per GPU (fwd+bwd)", "peak memory per GPU (GiB)"]
    for ax, title in zip(axes[0], titles):
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqs, [_tokens(s) for s in seqs])
        ax.set_xlabel("total sequence length")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{cfg['nproc']}x {env['device']}, H={cfg['heads']}, D={cfg['head_dim']}, {cfg['dtype']}, "
                 f"{'causal' if cfg['causal'] else 'full'}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sp_report", description=__doc__.splitlines()[0])
    p.add_argument("result", type=Path, help="a benchmarks/results/sp_attention_*.json file")
    p.add_argument("--png", type=Path, default=None, help="write the plot here (e.g. docs/img/sp_attention.png)")
    p.add_argument("--md", type=Path, default=None, help="write the markdown here instead of printing it")
    args = p.parse_args(argv)
    record = json.loads(args.result.read_text())
    if record.get("benchmark") != "sp_attention":
        print(f"{args.result} is not an sp_attention result", file=sys.stderr)
        return 2
    text = markdown(record)
    if args.png:
        import os

        link = os.path.relpath(args.png, args.md.parent) if args.md else str(args.png)
        text += f"\n![sp attention]({link})\n"
        plot(record, args.png)
    if args.md:
        args.md.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
