"""``python -m benchmarks NAME [ARGS]``: run one registered benchmark and save its result."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .registry import REGISTRY, discover
from .results import save


def _list(errors: dict[str, str]) -> int:
    width = max((len(n) for n in REGISTRY), default=4)
    for name in sorted(REGISTRY):
        print(f"{name:<{width}}  {REGISTRY[name].help}")
    for module, err in errors.items():
        print(f"(module benchmarks.{module} failed to import: {err})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    errors = discover()
    if not argv or argv[0] in {"list", "-h", "--help"}:
        print("usage: python -m benchmarks NAME [ARGS]   (NAME from the list below; NAME -h for its flags)\n")
        return _list(errors)
    name, rest = argv[0], argv[1:]
    if name not in REGISTRY:
        hint = f" (module failed to import: {errors[name]})" if name in errors else ""
        print(f"unknown benchmark {name!r}{hint}; known: {', '.join(sorted(REGISTRY))}", file=sys.stderr)
        return 2
    bench = REGISTRY[name]
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=bench.help)
    parser.add_argument("--out", type=Path, default=None, help="result file (default: a new file in benchmarks/results/)")
    parser.add_argument("--no-save", action="store_true", help="print the numbers, write no file")
    bench.add_arguments(parser)
    args = parser.parse_args(rest)
    numbers = bench.run(args)
    saved = {k: v for k, v in vars(args).items() if k not in {"out", "no_save"}}
    if args.no_save:
        print(json.dumps(numbers, indent=2, default=str))
    else:
        path = save(name, saved, numbers, args.out)
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
