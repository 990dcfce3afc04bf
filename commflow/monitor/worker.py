"""``python -m commflow.monitor.worker [-m module | script.py] args...``

What ``commflow launch`` runs in place of ``python script.py args``: it turns the
monitor on (:func:`commflow.monitor.watch`, configured from the environment the
supervisor set), then runs the script or module as ``__main__`` with its own
``sys.argv``, exactly as python would. When the script ends it says goodbye on the
side channel (with the traceback if it raised), so the coordinator can tell a worker
that failed on its own from one that vanished. No sitecustomize, no edits to the
user's code.
"""

from __future__ import annotations

import runpy
import sys
import traceback

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("usage: python -m commflow.monitor.worker [-m module | script.py] [args...]", file=sys.stderr)
        return 2
    from . import runtime

    runtime.watch()
    error = None
    code: int | str | None = 0
    try:
        if argv[0] == "-m":
            if len(argv) < 2:
                print("commflow.monitor.worker: -m needs a module name", file=sys.stderr)
                return 2
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, str(__import__("pathlib").Path(argv[0]).resolve().parent))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code
        if code not in (0, None):
            error = f"exited with code {code}"
    except BaseException:
        error = traceback.format_exc()
        code = 1
        traceback.print_exc()
    finally:
        runtime.unwatch(error=error)
    if isinstance(code, str):
        print(code, file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
