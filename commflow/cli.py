"""The ``commflow`` command.

Each part of commflow owns its command-line surface in its own ``cli.py`` (a typer
app or a single command) and is mounted here, so this file stays a table of
contents: train, launch, monitor, net, decentral, bench.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

app = typer.Typer(
    name="commflow",
    help="The communication layer of large-scale LLM training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """commflow: make the traffic of LLM training cheap, watch it, and plan it."""


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
def bench(ctx: typer.Context, name: str = typer.Argument("list", help="benchmark name, or 'list'")) -> None:
    """Run a registered benchmark (same as ``python -m benchmarks NAME ...``)."""
    try:
        import benchmarks.__main__ as runner
    except ImportError:
        # An editable install: the benchmarks/ folder sits beside the package.
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        import benchmarks.__main__ as runner
    raise typer.Exit(runner.main([name, *ctx.args]))


# --- mount points: one line per part -----------------------------------------
app.add_typer(__import__("commflow.train.cli", fromlist=["app"]).app, name="train", help="Train a hybrid Linear-Llama with sequence parallelism (the main job).")
app.command("decentral")(__import__("commflow.decentral.cli", fromlist=["decentral"]).decentral)
app.add_typer(__import__("commflow.net.cli", fromlist=["app"]).app, name="net")
app.add_typer(__import__("commflow.overlap.cli", fromlist=["app"]).app, name="overlap")
app.command("launch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(__import__("commflow.monitor.cli", fromlist=["launch"]).launch)
app.add_typer(__import__("commflow.monitor.cli", fromlist=["app"]).app, name="monitor")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
