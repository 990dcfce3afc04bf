"""The benchmark registry: name -> entry point, arguments and help."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Benchmark", "REGISTRY", "register", "discover"]


@dataclass(frozen=True)
class Benchmark:
    name: str
    """Registry key and the prefix of result files."""
    run: Callable[[argparse.Namespace], dict[str, Any]]
    """Takes the parsed arguments, returns the numbers (JSON-serialisable)."""
    add_arguments: Callable[[argparse.ArgumentParser], None]
    """Adds the benchmark's own flags to its parser."""
    help: str
    """One line for ``list``."""
    module: str


REGISTRY: dict[str, Benchmark] = {}


def register(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Decorator: register ``fn(args) -> dict`` as benchmark ``name``."""

    def wrap(fn: Callable[[argparse.Namespace], dict[str, Any]]):
        if name in REGISTRY and REGISTRY[name].module != fn.__module__:
            raise ValueError(f"benchmark {name!r} registered twice ({REGISTRY[name].module}, {fn.__module__})")
        REGISTRY[name] = Benchmark(name, fn, arguments or (lambda p: None), help, fn.__module__)
        return fn

    return wrap


def discover() -> dict[str, str]:
    """Import every public module of this package; return {module: error} for failures.

    Benchmark modules keep heavy or optional imports (deepspeed, fla, triton)
    inside their entry points, so discovery works on any machine.
    """
    errors: dict[str, str] = {}
    here = Path(__file__).parent
    for info in pkgutil.iter_modules([str(here)]):
        if info.name.startswith("_") or info.name in {"registry", "results", "timing"}:
            continue
        try:
            importlib.import_module(f"{__package__}.{info.name}")
        except Exception as e:  # noqa: BLE001 - reported by `list`
            errors[info.name] = f"{type(e).__name__}: {e}"
    return errors
