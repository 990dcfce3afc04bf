"""commflow.monitor: collective-communication health (C4D) on torch.distributed.

Trace every collective and point-to-point call of a worker (:func:`watch`), report
over a side channel to a coordinator that detects hangs, crashes, slow ranks and
slow links from peer homogeneity and periodicity, localizes the culprit (rank, GPU,
host, link; a pairwise probe sweep when statistics cannot tell a link from its
ends), and -- under ``commflow launch`` -- restarts the job from its last checkpoint
without the culprit. See docs/monitor.md.
"""

from .coordinator import Coordinator, ProbeConfig
from .detect import DetectConfig, Detector, Verdict
from .inject import Fault, Injector, parse_fault, resolve_faults
from .localize import analyze_matrix, tournament
from .runtime import current, quiet, step, unwatch, watch
from .trace import CommRecord, Tracer

__all__ = [
    "CommRecord",
    "Coordinator",
    "DetectConfig",
    "Detector",
    "Fault",
    "Injector",
    "ProbeConfig",
    "Tracer",
    "Verdict",
    "analyze_matrix",
    "current",
    "parse_fault",
    "quiet",
    "resolve_faults",
    "step",
    "tournament",
    "unwatch",
    "watch",
]
