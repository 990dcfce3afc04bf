"""The side channel: each worker's reporter thread <-> the coordinator, over TCP.

Why not torch's TCPStore: the coordinator needs a stream (records arrive continuously,
heartbeats every 100 ms, probe requests go the other way) and must notice the moment a
worker's connection drops (a crash). A store would have to be polled key by key.

Worker side, :class:`Reporter`, a daemon thread that

* every ``interval`` s sends the tracer's new records, step marks and injected-fault
  events plus a heartbeat listing the calls still in flight; so while the main thread
  sits in a collective that never returns, the coordinator keeps hearing "rank 2 has
  been inside all_reduce #812 of group 0,1,2,3 since t" (gloo, NCCL waits and our
  injected hangs release the GIL; a main thread that *holds* the GIL silences the
  heartbeat, which the coordinator reads as that rank being stuck);
* polls async works / CUDA events that have no completion callback;
* never blocks the main thread: the two share only deques;
* measures its clock offset to the coordinator (min-RTT of a few pings, Cristian's
  method) so timestamps from several hosts compare.

Coordinator side, :class:`ChannelServer`: one selector loop, newline-delimited JSON,
callbacks for messages and for disconnects.

Wire format (one JSON object per line):
    worker -> coordinator: {"hello": {...}, "t": ...} | {"ping": t0} |
        {"t": now, "hb": {...}, "ev": [...]} | {"bye": {"ok": bool, "error": str|None}}
    coordinator -> worker: {"pong": [t0, t_server]} | {"cmd": "probe", ...}
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["ChannelServer", "Reporter", "parse_endpoint"]


def parse_endpoint(text: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port); ValueError naming the value otherwise."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {text!r} must be host:port with a port in 1..65535")
    return host, int(port)


class Reporter(threading.Thread):
    """Ships a :class:`~commflow.monitor.trace.Tracer`'s events to the coordinator.

    Args:
        endpoint: ``host:port`` of the coordinator.
        tracer: the tracer to drain.
        hello: identity sent on connect (rank, slot, host, pid, gpu, ...).
        interval: seconds between reports (heartbeat period).
        poll_interval: seconds between completion polls while calls are in flight
            (CUDA events, gloo works without a future); each poll takes the GIL.
        on_command: called (in this thread) with each command from the coordinator.
    """

    def __init__(
        self,
        endpoint: str,
        tracer: Any,
        hello: dict,
        *,
        interval: float = 0.1,
        poll_interval: float = 0.05,
        on_command: Callable[[dict], None] | None = None,
        max_events_per_message: int = 4000,
    ):
        super().__init__(name="commflow-monitor-reporter", daemon=True)
        self.addr = parse_endpoint(endpoint)
        self.tracer = tracer
        self.hello = dict(hello)
        self.interval = interval
        self.poll_interval = poll_interval
        self.on_command = on_command or (lambda cmd: None)
        self.max_events = max_events_per_message
        self.offset = 0.0  # coordinator clock - this clock
        self.connected = threading.Event()
        self._stopping = threading.Event()
        self._bye: dict | None = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self._sent_offset = False
        self.extra: dict = {}  # merged into every heartbeat

    # -- connection -------------------------------------------------------------------

    def _connect(self) -> None:
        sock = socket.create_connection(self.addr, timeout=2.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(5.0)
        self._sock = sock
        self._send({"hello": self.hello, "t": time.time()})
        best = None
        for _ in range(3):  # min-RTT ping: offset = t_server - midpoint
            t0 = time.time()
            self._send({"ping": t0})
            reply = self._read_until(lambda m: "pong" in m, timeout=2.0)
            t1 = time.time()
            if reply is None:
                break
            rtt = t1 - t0
            if best is None or rtt < best[0]:
                best = (rtt, reply["pong"][1] - (t0 + t1) / 2)
        if best is not None:
            self.offset = best[1]
        self._sent_offset = False
        self.connected.set()

    def _send(self, msg: dict) -> None:
        assert self._sock is not None
        self._sock.sendall((json.dumps(msg, separators=(",", ":")) + "\n").encode())

    def _read_until(self, want: Callable[[dict], bool], timeout: float) -> dict | None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for msg in self._read(max(0.0, deadline - time.time())):
                if want(msg):
                    return msg
                self._dispatch(msg)
        return None

    def _read(self, timeout: float) -> list[dict]:
        sock = self._sock
        if sock is None:
            return []
        sel_timeout = max(0.0, timeout)
        import select

        ready, _, _ = select.select([sock], [], [], sel_timeout)
        if not ready:
            return []
        data = sock.recv(1 << 16)
        if not data:
            raise ConnectionError("coordinator closed the connection")
        self._buf += data
        out = []
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            if line.strip():
                out.append(json.loads(line))
        return out

    def _dispatch(self, msg: dict) -> None:
        if "cmd" in msg:
            try:
                self.on_command(msg)
            except Exception as e:  # noqa: BLE001 - a bad command must not kill reporting
                self.tracer.outbox.append(("log", f"command {msg.get('cmd')} failed: {e!r}"))

    # -- reporting ----------------------------------------------------------------------

    def _events(self) -> list:
        out = []
        box = self.tracer.outbox
        while box and len(out) < self.max_events:
            item = box.popleft()
            if isinstance(item, tuple):
                out.append(list(item))
            else:  # a CommRecord
                out.append(["r", *item.wire()])
        return out

    def _report(self) -> None:
        tr = self.tracer
        # In-flight first, then the outbox: a call finishing in between shows up in
        # both (done wins at the coordinator) rather than in neither.
        inflight = [r.inflight_wire() for r in list(tr.inflight.values())]
        events = self._events()
        hb = {"it": tr.iteration, "quiet": tr.quiet_depth, "inflight": inflight, "calls": tr.calls,
              "dropped": tr.dropped, **self.extra}
        msg: dict = {"t": time.time(), "hb": hb, "ev": events}
        if not self._sent_offset:
            msg["offset"] = self.offset
            self._sent_offset = True
        self._send(msg)

    def run(self) -> None:
        self._use_device()
        next_report = 0.0
        next_connect = 0.0
        while True:
            stopping = self._stopping.is_set()
            try:
                if self._sock is None:
                    if stopping:
                        return
                    if time.time() >= next_connect:
                        try:
                            self._connect()
                        except OSError:
                            self._close_sock()
                            next_connect = time.time() + 0.5
                    if self._sock is None:
                        time.sleep(0.05)
                        continue
                self.tracer.poll()
                now = time.time()
                if now >= next_report or stopping:
                    self._report()
                    while stopping and self.tracer.outbox:
                        self._report()
                    next_report = now + self.interval
                if stopping:
                    self._send({"bye": self._bye or {"ok": True, "error": None}})
                    self._close_sock()
                    return
                wait = self.poll_interval if self.tracer.pending_poll else min(self.interval, 0.05)
                for msg in self._read(wait):
                    self._dispatch(msg)
            except (OSError, ConnectionError, ValueError):
                self._close_sock()
                if stopping:
                    return
                next_connect = time.time() + 0.5

    def _use_device(self) -> None:
        """Make this thread's current CUDA device the worker's, so the lazy queries of
        the tracer's CUDA events run in the right context."""
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        except Exception:  # noqa: BLE001 - CPU worker or no CUDA yet: nothing to do
            pass

    def _close_sock(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self._buf = b""
        self.connected.clear()

    def close(self, *, ok: bool = True, error: str | None = None, timeout: float = 3.0) -> None:
        """Flush what is left, say goodbye (clean exit or the error), stop the thread."""
        self._bye = {"ok": ok, "error": error}
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)


class ChannelServer:
    """Accepts reporter connections; calls back per message and per disconnect.

    Not thread-safe: :meth:`poll` and :meth:`send` belong to one thread (the
    coordinator loop).

    Args:
        host: interface to listen on ("0.0.0.0" for multi-node).
        port: 0 picks a free port (see :attr:`port`).
        on_message: ``(conn_id, msg, t_recv)``.
        on_close: ``(conn_id, t_closed)``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        on_message: Callable[[int, dict, float], None],
        on_close: Callable[[int, float], None],
    ):
        self.on_message = on_message
        self.on_close = on_close
        self.sel = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(512)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.conns: dict[int, socket.socket] = {}
        self._bufs: dict[int, bytes] = {}
        self._next_id = 0

    def poll(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            if key.data is None:
                try:
                    sock, _ = self.listener.accept()
                except OSError:
                    continue
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._next_id += 1
                cid = self._next_id
                self.conns[cid] = sock
                self._bufs[cid] = b""
                self.sel.register(sock, selectors.EVENT_READ, cid)
                continue
            cid = key.data
            sock = self.conns.get(cid)
            if sock is None:
                continue
            try:
                data = sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            now = time.time()
            if not data:
                self._drop(cid)
                self.on_close(cid, now)
                continue
            buf = self._bufs[cid] + data
            *lines, self._bufs[cid] = buf.split(b"\n")
            for line in lines:
                if line.strip():
                    try:
                        msg = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if "ping" in msg:
                        self.send(cid, {"pong": [msg["ping"], time.time()]})
                    else:
                        self.on_message(cid, msg, now)

    def send(self, cid: int, msg: dict) -> bool:
        sock = self.conns.get(cid)
        if sock is None:
            return False
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        try:
            sock.setblocking(True)
            sock.settimeout(2.0)
            sock.sendall(data)
            return True
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                sock.setblocking(False)

    def _drop(self, cid: int) -> None:
        sock = self.conns.pop(cid, None)
        self._bufs.pop(cid, None)
        if sock is not None:
            with contextlib.suppress(Exception):
                self.sel.unregister(sock)
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        for cid in list(self.conns):
            self._drop(cid)
        with contextlib.suppress(Exception):
            self.sel.unregister(self.listener)
        self.listener.close()
        self.sel.close()


def default_hello(rank: int, slot: int, world: int, **extra: Any) -> dict:
    """Who this worker is: rank -> slot -> GPU -> host, for localization."""
    import socket as _s

    info = {
        "rank": rank,
        "slot": slot,
        "world": world,
        "local_rank": int(os.environ.get("LOCAL_RANK", rank)),
        "host": _s.gethostname(),
        "pid": os.getpid(),
        "agent_pid": os.getppid(),  # the elastic agent (supervisor) that started this worker
        "node": int(os.environ.get("COMMFLOW_NODE", os.environ.get("GROUP_RANK", 0))),
        "attempt": int(os.environ.get("COMMFLOW_ATTEMPT", 0)),
        "gpu": None,
    }
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        devs = [d.strip() for d in visible.split(",") if d.strip()]
        lr = info["local_rank"]
        info["gpu"] = devs[lr] if lr < len(devs) else None
    info.update(extra)
    return info
