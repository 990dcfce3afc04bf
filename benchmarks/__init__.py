"""commflow benchmarks: one runner, one registry.

``python -m benchmarks NAME [ARGS]`` (or ``commflow bench NAME [ARGS]``) runs the
benchmark registered as NAME and writes its result to benchmarks/results/ as JSON
with the device, GPU count, library versions, git commit and arguments.
``python -m benchmarks list`` shows what is registered. A benchmark is a module in
this package that decorates its entry point with :func:`register`.
"""

from .registry import REGISTRY, Benchmark, discover, register

__all__ = ["REGISTRY", "Benchmark", "discover", "register"]
