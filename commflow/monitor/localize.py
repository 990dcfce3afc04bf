"""Which rank, GPU, host or link: the pairwise probe sweep and the latency matrix.

A collective's timing says *that* the transfer is slow, not *where*: every rank waits
for the slowest edge of the ring. The probe sweep measures every directed edge on its
own. A round-robin tournament (the circle method) pairs all ``W`` ranks into ``W/2``
disjoint pairs per round, and ``W - 1`` rounds cover every pair exactly once (``W``
rounds with a bye when ``W`` is odd), so pairs in a round run at the same time without
sharing an endpoint. Each round has two phases, ``a -> b`` then ``b -> a``; in each the
receiver times the message from a common barrier to its arrival, so no clocks are
compared.

:func:`analyze_matrix` reads the ``W x W`` matrix as C4D's latency matrix: against the
median edge (robust z with the MAD), a whole *row* elevated is the sender side of one
rank (its NIC, PCIe or GPU), a whole *column* its receiving side, both at once the rank,
and an isolated cell (or the pair of cells of one cable) the link. An edge whose message
never arrived within the timeout is a dead link.

:func:`run_sweep` is one function for both ways of running it: online, in each
worker's reporter thread over a fresh gloo group on the job's store (works while the
training threads are stuck in a collective), or offline as its own job
(``python -m commflow.monitor.probe``, NCCL on GPUs) after the workers were stopped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "LinkFinding",
    "analyze_matrix",
    "choose_exclusion",
    "describe_ranks",
    "run_sweep",
    "tournament",
]


def tournament(world: int) -> list[list[tuple[int, int]]]:
    """Rounds of disjoint pairs covering every unordered pair once (circle method).

    ``world - 1`` rounds for even ``world``, ``world`` rounds for odd (one rank sits
    out each round). Rank ``world - 1`` (or the bye) stays fixed, the rest rotate.
    """
    if world < 2:
        return []
    n = world if world % 2 == 0 else world + 1
    ring = list(range(n))
    rounds = []
    for _ in range(n - 1):
        pairs = []
        for i in range(n // 2):
            a, b = ring[i], ring[n - 1 - i]
            if a < world and b < world:
                pairs.append((min(a, b), max(a, b)))
        rounds.append(pairs)
        ring = [ring[0], ring[-1], *ring[1:-1]]  # keep ring[0] fixed, rotate the rest
    return rounds


def _wait(work: object, timeout_s: float, finish: Callable[[object], None] | None = None) -> float | None:
    """Block until ``work`` is done, in a helper thread, for at most ``timeout_s``; return
    the time it completed (perf_counter) or None. ``finish(work)`` blocks until the bytes
    have moved (default ``work.wait()``: gloo's send/recv works report completion only
    through it). A timed-out wait would close a gloo pair for good, so a late work is
    simply left behind."""
    done = threading.Event()
    t_done: list[float] = []

    def waiter() -> None:
        try:
            (finish or _wait_work)(work)
            t_done.append(time.perf_counter())
        except Exception:  # noqa: BLE001 - a broken pair counts as no delivery
            pass
        done.set()

    threading.Thread(target=waiter, name="commflow-probe-wait", daemon=True).start()
    done.wait(timeout_s)
    return t_done[0] if t_done else None


def _wait_work(work: object) -> None:
    work.wait()  # type: ignore[attr-defined]


def run_sweep(
    *,
    rank: int,
    world: int,
    send: Callable[[object, int, int], object],
    recv: Callable[[object, int, int], object],
    barrier: Callable[[], None],
    make_buffer: Callable[[], object],
    edge_delay: Callable[[int], float | None] | None = None,
    reps: int = 3,
    timeout_s: float = 2.0,
    on_round: Callable[[dict], None] | None = None,
    finish: Callable[[object], None] | None = None,
) -> dict[int, list[float | None]]:
    """Time every directed edge ``src -> rank``; return ``{src: [seconds or None]}``.

    ``send(buf, dst, tag)`` / ``recv(buf, src, tag)`` start a transfer and return a work with
    ``wait()``; ``barrier()`` lines all ranks up before each transfer and must not use
    the links under test (the online sweep uses the store). ``edge_delay(dst)`` is the
    fault injector's say on this rank's edge to ``dst``: extra seconds, or None if the
    link is down (the send is then never posted). A transfer not done after
    ``timeout_s`` counts as not delivered (None) and is left pending. ``on_round``
    gets the results so far after each round, so a sweep that stalls still reports.
    """
    got: dict[int, list[float | None]] = {}
    buf_out, buf_in = make_buffer(), make_buffer()
    # Repetitions are the outer loop: the same edge is measured a whole sweep apart, so
    # a rank that was briefly starved of CPU spoils one sample per edge, not all of them.
    # Each repetition has its own tag, so a receive left pending by a lost message
    # cannot swallow the next repetition's message.
    for rep in range(reps):
        for pairs in tournament(world):
            partner = next((b if a == rank else a for a, b in pairs if rank in (a, b)), None)
            for phase in range(2):
                barrier()  # every rank, every phase: the barrier count must match
                if partner is None:
                    continue
                a, b = (min(rank, partner), max(rank, partner))
                sender, receiver = (a, b) if phase == 0 else (b, a)
                if rank == sender:
                    delay = edge_delay(receiver) if edge_delay else 0.0
                    if delay is None:
                        continue  # a dead link: the bytes never leave
                    if delay > 0:
                        time.sleep(delay)
                    _wait(send(buf_out, receiver, rep), timeout_s, finish)
                    continue
                t0 = time.perf_counter()
                t_done = _wait(recv(buf_in, sender, rep), timeout_s, finish)
                got.setdefault(sender, []).append(None if t_done is None else t_done - t0)
            if on_round is not None:
                on_round({k: list(v) for k, v in got.items()})
    return got


def matrix_from_rows(rows: dict[int, dict], world: int) -> np.ndarray:
    """Assemble ``M[src, dst]`` (seconds; inf = never arrived; nan = unmeasured)
    from each receiver's ``{src: [latencies]}``.

    An edge's value is the *fastest* of its repetitions: noise (a descheduled
    process, a burst of other traffic) only ever adds time, so the minimum is the
    edge's own latency, and an edge counts as slow only if it was slow every time.
    It is dead only if no repetition arrived.
    """
    m = np.full((world, world), np.nan)
    for dst, by_src in rows.items():
        for src, lats in by_src.items():
            src, dst_i = int(src), int(dst)
            if src >= world or dst_i >= world:
                continue
            vals = [v for v in lats if v is not None]
            m[src, dst_i] = min(vals) if vals else np.inf
    return m


@dataclass(kw_only=True)
class LinkFinding:
    """What the latency matrix says."""

    where: str
    """"link" | "rank" | "sender" | "receiver" | "none"."""
    ranks: list[int] = field(default_factory=list)
    link: list[int] | None = None
    dead: bool = False
    """Some bad edge never delivered (a communication hang rather than slowness)."""
    evidence: dict = field(default_factory=dict)


def analyze_matrix(
    m: np.ndarray,
    *,
    kappa: float = 6.0,
    rel: float = 1.0,
    abs_floor_s: float = 0.002,
) -> LinkFinding:
    """Classify the bad edges of a probe matrix (see module docstring).

    An edge is bad when it never arrived or exceeds the median edge by more than
    ``max(kappa * sigma, rel * median, abs_floor_s)`` with sigma = 1.4826 MAD over
    edges: far outside the spread of its peers *and* large in absolute terms. With two
    ranks (two edges) the reference is the faster edge and sigma is 0.
    """
    w = m.shape[0]
    off = ~np.eye(w, dtype=bool)
    vals = m[off & np.isfinite(m)]
    if vals.size == 0:
        return LinkFinding(where="none", evidence={"note": "no edge was measured"})
    if vals.size >= 3:
        base = float(np.median(vals))
        sigma = float(1.4826 * np.median(np.abs(vals - base)))
    else:
        # Two ranks: the cable's two directions are all there is, and the median of two
        # is their mean, which a slow direction drags up with it (a 20 ms edge beside a
        # 1 ms one never passed). The faster direction is the reference instead.
        base, sigma = float(np.min(vals)), 0.0
    limit = base + max(kappa * sigma, rel * base, abs_floor_s)
    bad = off & ~np.isnan(m) & ((m > limit) | np.isinf(m))
    cells = [(int(s), int(d)) for s, d in zip(*np.nonzero(bad))]
    ms = np.where(np.isfinite(m), np.round(m * 1e3, 3), -1.0)  # ms; -1 = never arrived
    ev = {
        "matrix_ms": ms.tolist(),
        "median_edge_ms": round(base * 1e3, 4),
        "limit_ms": round(limit * 1e3, 4),
        "bad_edges": [list(c) for c in cells],
        "note": "rows send, columns receive; -1 = the message never arrived",
    }
    if not cells:
        return LinkFinding(where="none", evidence=ev)
    dead = any(np.isinf(m[s, d]) for s, d in cells)

    def row_bad(x: int) -> bool:
        return all(bad[x, j] for j in range(w) if j != x)

    def col_bad(x: int) -> bool:
        return all(bad[i, x] for i in range(w) if i != x)

    if w >= 3:  # with two ranks a row, a column and a link are the same cell
        for x in range(w):
            r, c = row_bad(x), col_bad(x)
            if r or c:
                where = "rank" if r and c else ("sender" if r else "receiver")
                explained = {(x, j) for j in range(w) if j != x} | {(i, x) for i in range(w) if i != x}
                ev["unexplained_edges"] = [list(e) for e in cells if e not in explained]
                return LinkFinding(where=where, ranks=[x], dead=dead, evidence=ev)
    # Isolated cells: links. The worst one (or the cable's two directions) is the answer.
    worst = max(cells, key=lambda e: (np.inf if np.isinf(m[e]) else m[e]))
    s, d = worst
    others = [list(e) for e in cells if e not in {(s, d), (d, s)}]
    if others:
        ev["other_bad_edges"] = others
    return LinkFinding(where="link", ranks=sorted({s, d}), link=[s, d], dead=dead, evidence=ev)


def choose_exclusion(finding: LinkFinding, m: np.ndarray | None = None) -> list[int]:
    """Which rank to take out for a finding: the rank itself, or for a link the
    endpoint whose *other* edges are worse (tie: the higher rank, so rank 0 -- often
    the one that logs and saves -- survives)."""
    if finding.where in ("rank", "sender", "receiver"):
        return list(finding.ranks)
    if finding.where != "link" or finding.link is None:
        return []
    s, d = finding.link
    if m is None:
        return [max(s, d)]

    def other_cost(x: int) -> float:
        w = m.shape[0]
        vals = [m[x, j] for j in range(w) if j not in (x, s, d)] + [m[i, x] for i in range(w) if i not in (x, s, d)]
        vals = [v for v in vals if np.isfinite(v)]
        return float(np.mean(vals)) if vals else 0.0

    cs, cd = other_cost(s), other_cost(d)
    if abs(cs - cd) <= 0.1 * max(cs, cd, 1e-9):
        return [max(s, d)]
    return [s if cs > cd else d]


def describe_ranks(ranks: Sequence[int], infos: dict[int, dict]) -> list[dict]:
    """rank -> slot -> GPU -> host, from the workers' hello messages."""
    out = []
    for r in ranks:
        info = infos.get(r, {})
        out.append({
            "rank": r,
            "slot": info.get("slot"),
            "host": info.get("host"),
            "node": info.get("node"),
            "local_rank": info.get("local_rank"),
            "gpu": info.get("gpu"),
            "pid": info.get("pid"),
        })
    return out


def sweep_in_thread(
    *,
    store_addr: tuple[str, int],
    prefix: str,
    rank: int,
    world: int,
    nbytes: int,
    reps: int,
    timeout_s: float,
    edge_delay: Callable[[int], float | None] | None,
    on_round: Callable[[dict], None] | None = None,
    backend: str = "gloo",
    device: int | None = None,
) -> dict[int, list[float | None]]:
    """Online probe: a private group on the job's store, from a background thread.

    ``backend="gloo"`` sends CPU tensors over TCP (the host network: the NIC path
    between nodes); ``"nccl"`` sends CUDA tensors on ``device`` (NVLink / the GPU's
    network path) on a stream of its own, never the job's, timed with a sync of that
    stream in the waiting helper thread.
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    store = dist.TCPStore(store_addr[0], store_addr[1], is_master=False, timeout=timedelta(seconds=30))
    prefixed = dist.PrefixStore(prefix, store)
    numel = max(1, nbytes // 4)
    finish = None
    send = lambda buf, dst, tag: pg.send([buf], dst, tag)  # noqa: E731
    recv = lambda buf, src, tag: pg.recv([buf], src, tag)  # noqa: E731
    if backend == "nccl":
        torch.cuda.set_device(device or 0)
        dev = torch.device("cuda", device or 0)
        pg = dist.ProcessGroupNCCL(dist.PrefixStore("pg", prefixed), rank, world, dist.ProcessGroupNCCL.Options())
        # The probe's own stream. On the default stream -- the job's -- each transfer
        # would first wait for the job's queued work, and wait() would make the job's
        # next kernels wait for the probe: with a job collective queued between them on
        # one rank and not the other, that is a cycle (the 2-GPU slow-link runs hung).
        stream = torch.cuda.Stream(dev)

        def on_stream(op):
            def run(buf, peer, tag):
                with torch.cuda.device(dev), torch.cuda.stream(stream):
                    return op([buf], peer, tag)
            return run

        send, recv = on_stream(pg.send), on_stream(pg.recv)

        def finish(work) -> None:
            # wait() orders the calling thread's current stream after NCCL's: make that
            # the probe's stream (a helper thread starts on the default one), then block.
            with torch.cuda.device(dev), torch.cuda.stream(stream):
                work.wait()
            stream.synchronize()

        def make_buffer():
            with torch.cuda.stream(stream):
                return torch.ones(numel, device=dev)
    else:
        pg = dist.ProcessGroupGloo(dist.PrefixStore("pg", prefixed), rank, world, timedelta(seconds=60))
        make_buffer = lambda: torch.ones(numel)  # noqa: E731
    count = [0]

    def store_barrier() -> None:
        # Through the store, not the links under test: a dead link must not stall it.
        count[0] += 1
        key = f"barrier/{count[0]}"
        if prefixed.add(key, 1) == world:
            prefixed.set(key + "/go", "1")
        prefixed.wait([key + "/go"])

    return run_sweep(
        rank=rank,
        world=world,
        send=send,
        recv=recv,
        barrier=store_barrier,
        make_buffer=make_buffer,
        edge_delay=edge_delay,
        reps=reps,
        timeout_s=timeout_s,
        on_round=on_round,
        finish=finish,
    )


gloo_sweep_in_thread = sweep_in_thread  # the name the CPU path has always used
