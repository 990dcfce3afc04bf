"""commflow.overlap.graphs: the bookkeeping around CUDA-graph replays, on CPU.

A CUDA graph cannot be captured here; a stand-in capture records the function and its
static buffers, and "replays" it by running it again into the captured output. What is
checked is what the real path must get right beside the graph itself: the workspace's
step counter (the schedule's buffer halves alternate with its parity), the copy-in of
new inputs, outputs that never alias the graph's buffers, capture failures, eviction.
"""

import warnings

import pytest
import torch

from commflow.overlap import graphs


class _Workspace:
    def __init__(self):
        self.counter = 0
        self.nbytes = 1 << 20


class _FakeGraph:
    def __init__(self, fn, statics, fixed, output, ws):
        self.fn, self.statics, self.fixed, self.output, self.ws = fn, statics, fixed, output, ws
        self.replays = 0

    def replay(self):
        # A replay re-issues the captured steps without touching the Python counter.
        before = self.ws.counter
        fresh = self.fn(*self.statics, *self.fixed)
        self.ws.counter = before
        if not callable(self.output):  # a split schedule's result is made after the replay
            self.output.copy_(fresh)
        self.replays += 1


@pytest.fixture
def fake_capture(monkeypatch):
    ws = _Workspace()
    made = []

    def capture(fn, statics, fixed, workspace):
        assert workspace is ws
        output = fn(*statics, *fixed)
        g = _FakeGraph(fn, statics, fixed, output, ws)
        made.append(g)
        return g, output

    monkeypatch.setattr(graphs, "_capture", capture)
    graphs.clear()
    yield ws, made
    graphs.clear()


def _schedule(ws, steps):
    """A schedule of ``steps`` steps whose result depends on the buffer half of each step
    (as symm.py's do): x @ w plus the parity of the first step's counter."""
    def fn(x, w):
        first = ws.counter & 1
        ws.counter += steps
        return x @ w + first
    return fn


def test_replays_follow_new_inputs_and_keep_the_counter(fake_capture):
    ws, made = fake_capture
    w = torch.randn(4, 3)
    fn = _schedule(ws, 2)  # even: the parity at every call is the same, one graph
    outs = []
    for _ in range(4):
        x = torch.randn(5, 4)
        y = graphs.graphed_call("rs", fn, (x,), (w,), ws)
        torch.testing.assert_close(y, x @ w)  # parity 0 at every call
        outs.append(y)
    assert ws.counter == 8
    assert len(made) == 1 and made[0].replays == 3
    # Results never alias the graph's buffer (the next replay would overwrite them).
    assert all(o.data_ptr() != made[0].output.data_ptr() for o in outs)
    assert len({o.data_ptr() for o in outs}) == len(outs)


def test_split_schedules_finish_after_each_replay_in_new_memory(fake_capture):
    ws, made = fake_capture
    w = torch.randn(4, 3)
    ws.buffer = torch.full((5, 3), float("nan"))  # the symmetric workspace the captured part writes

    def fn(x, w):  # like symm's split=True: one step, the graphed part ends in the workspace
        ws.counter += 1
        torch.mm(x, w, out=ws.buffer)
        return lambda: ws.buffer * 2  # the last step, outside the graph, into new memory

    outs = []
    for _ in range(4):
        x = torch.randn(5, 4)
        y = graphs.graphed_call("ar", fn, (x,), (w,), ws)
        assert isinstance(y, torch.Tensor)  # the first (eager) call finishes too
        torch.testing.assert_close(y, 2 * (x @ w))
        outs.append(y)
    assert ws.counter == 4 and len(made) == 2 and sorted(g.replays for g in made) == [1, 1]  # the parities alternate
    assert len({o.data_ptr() for o in outs} | {ws.buffer.data_ptr()}) == len(outs) + 1


def test_odd_schedules_alternate_between_two_graphs(fake_capture):
    ws, made = fake_capture
    w = torch.randn(4, 3)
    fn = _schedule(ws, 1)
    for i in range(6):
        x = torch.randn(5, 4)
        y = graphs.graphed_call("ag", fn, (x,), (w,), ws)
        torch.testing.assert_close(y, x @ w + (i & 1))
    assert ws.counter == 6
    assert len(made) == 2 and sorted(g.replays for g in made) == [2, 2]


def test_weight_address_and_extra_are_part_of_the_signature(fake_capture):
    ws, made = fake_capture
    fn = _schedule(ws, 2)
    x = torch.randn(5, 4)
    w1, w2 = torch.randn(4, 3), torch.randn(4, 3)
    graphs.graphed_call("rs", fn, (x,), (w1,), ws, extra=(2, 2))
    graphs.graphed_call("rs", fn, (x,), (w2,), ws, extra=(2, 2))
    graphs.graphed_call("rs", fn, (x,), (w2,), ws, extra=(4,))
    assert len(made) == 3
    torch.testing.assert_close(graphs.graphed_call("rs", fn, (x,), (w2,), ws, extra=(4,)), x @ w2)


def test_a_failed_capture_falls_back_to_eager_once_warned(monkeypatch):
    ws = _Workspace()
    calls = []

    def broken(fn, statics, fixed, workspace):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_capture", broken)
    graphs.clear()
    plain = _schedule(ws, 2)

    def split(x, w):  # a split schedule (symm.splits) hands back its last step
        y = plain(x, w)
        return lambda: y

    w = torch.randn(4, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            x = torch.randn(5, 4)
            torch.testing.assert_close(graphs.graphed_call("ar", plain, (x,), (w,), ws), x @ w)
            torch.testing.assert_close(graphs.graphed_call("rs", split, (x,), (w,), ws), x @ w)
    assert len(calls) == 2 and ws.counter == 12
    assert sum("capture of ar failed" in str(c.message) for c in caught) == 1
    assert sum("capture of rs failed" in str(c.message) for c in caught) == 1
    graphs.clear()


def test_lru_keeps_at_most_max_graphs(fake_capture, monkeypatch):
    ws, made = fake_capture
    monkeypatch.setattr(graphs, "MAX_GRAPHS", 3)
    fn = _schedule(ws, 2)
    x = torch.randn(5, 4)
    for _ in range(5):
        graphs.graphed_call("rs", fn, (x,), (torch.randn(4, 3),), ws)
    assert len(graphs._GRAPHS) == 3


def test_graphs_of_one_kind_share_their_static_inputs(fake_capture):
    """One set of static inputs per op and shapes, whatever the weight: a graph per layer
    must not cost a copy of the layer's input each. Replays of interleaved layers still see
    each call's own input."""
    ws, made = fake_capture
    fn = _schedule(ws, 2)
    layers = [torch.randn(4, 3) for _ in range(3)]
    for _ in range(3):
        for w in layers:
            x = torch.randn(5, 4)
            torch.testing.assert_close(graphs.graphed_call("rs", fn, (x,), (w,), ws), x @ w)
    assert len(made) == 3 and [g.replays for g in made] == [2, 2, 2]
    assert made[0].statics is made[1].statics is made[2].statics
    wide = torch.randn(6, 3)  # another input shape: another kind, its own statics
    graphs.graphed_call("rs", fn, (torch.randn(5, 6),), (wide,), ws)
    assert made[-1].statics is not made[0].statics


def test_held_output_bytes_bound_the_cache(fake_capture, monkeypatch):
    """Graphs that keep an output of their own (copied out after each replay) count its bytes
    against MAX_GRAPH_BYTES; split graphs keep none and are bounded by MAX_GRAPHS only.
    held_bytes() adds the static inputs (one set per kind)."""
    ws, made = fake_capture
    out_bytes, in_bytes = 5 * 3 * 4, 5 * 4 * 4
    monkeypatch.setattr(graphs, "MAX_GRAPH_BYTES", 2 * out_bytes + 10)  # two [5, 3] fp32 outputs
    fn = _schedule(ws, 2)
    x = torch.randn(5, 4)
    for _ in range(4):
        graphs.graphed_call("rs", fn, (x,), (torch.randn(4, 3),), ws)
    assert len(graphs._GRAPHS) == 2 and graphs.held_bytes() == 2 * out_bytes + in_bytes
    ws.buffer = torch.zeros(5, 3)

    def split(x, w):
        ws.counter += 2
        torch.mm(x, w, out=ws.buffer)
        return lambda: ws.buffer.clone()

    for _ in range(4):
        graphs.graphed_call("ar", split, (x,), (torch.randn(4, 3),), ws)
    assert len(graphs._GRAPHS) == 6 and graphs.held_bytes() == 2 * out_bytes + 2 * in_bytes


def test_graphs_of_one_kind_write_into_shared_output_buffers(fake_capture, monkeypatch):
    """With ``shared_out`` the schedule writes into the kind's buffers: every result, the
    first (eager) call's included, is a copy; graphs keep no output of their own, so a tiny
    MAX_GRAPH_BYTES evicts none of them; a layer's result survives the next layer's replay."""
    ws, made = fake_capture
    monkeypatch.setattr(graphs, "MAX_GRAPH_BYTES", 1)

    def fn(x, w):
        out, = graphs.kind_buffers("ag", ws, ((5, 3),), torch.float32, torch.device("cpu"))
        ws.counter += 2
        return torch.mm(x, w, out=out)

    layers = [torch.randn(4, 3) for _ in range(3)]
    buffer, = graphs.kind_buffers("ag", ws, ((5, 3),), torch.float32, torch.device("cpu"))
    for _ in range(3):
        kept = []
        for w in layers:
            x = torch.randn(5, 4)
            kept.append((graphs.graphed_call("ag", fn, (x,), (w,), ws, shared_out=True), x @ w))
        for y, expected in kept:
            assert y.data_ptr() != buffer.data_ptr()
            torch.testing.assert_close(y, expected)
    assert len(made) == 3 and [g.replays for g in made] == [2, 2, 2]
    assert all(g.output.data_ptr() == buffer.data_ptr() for g in made)
    assert graphs.held_bytes() == 5 * 3 * 4 + 5 * 4 * 4  # one output buffer, one static input


def test_inputs_and_buffers_of_evicted_kinds_are_freed(fake_capture, monkeypatch):
    """Shapes that change every step (variable sequence lengths) must not pile up static
    inputs and output buffers: once no kept graph uses a kind's, they go with the graphs."""
    ws, made = fake_capture
    monkeypatch.setattr(graphs, "MAX_GRAPHS", 3)
    w = torch.randn(4, 3)

    def fn(x, w):
        out, = graphs.kind_buffers("ag", ws, ((x.shape[0], 3),), torch.float32, torch.device("cpu"))
        ws.counter += 2
        return torch.mm(x, w, out=out)

    for rows in range(2, 12):
        x = torch.randn(rows, 4)
        for _ in range(2):
            torch.testing.assert_close(graphs.graphed_call("ag", fn, (x,), (w,), ws, shared_out=True), x @ w)
    assert len(graphs._GRAPHS) == 3 and len(graphs._STATICS) == 3 and len(graphs._BUFFERS) == 3
    kept_rows = {key[5][0][0][0] for key in graphs._GRAPHS}
    assert kept_rows == {9, 10, 11} and {k[2][0][0] for k in graphs._BUFFERS} == kept_rows


def test_enabled_on_cuda_unless_switched_off(monkeypatch):
    monkeypatch.delenv("COMMFLOW_OVERLAP_GRAPHS", raising=False)
    assert not graphs.graphs_enabled(torch.device("cpu"))
    assert graphs.graphs_enabled(torch.device("cuda", 0))  # on by default (measured faster on 4xH100)
    monkeypatch.setenv("COMMFLOW_OVERLAP_GRAPHS", "0")
    assert not graphs.graphs_enabled(torch.device("cuda", 0))
    monkeypatch.setenv("COMMFLOW_OVERLAP_GRAPHS", "1")
    assert graphs.graphs_enabled(torch.device("cuda", 0))
    assert not graphs.graphs_enabled(torch.device("cpu"))
    graphs.set_graphs(False)
    try:
        assert not graphs.graphs_enabled(torch.device("cuda", 0))
    finally:
        graphs.set_graphs(None)


def test_a_grown_workspace_is_captured_again(fake_capture):
    ws, made = fake_capture
    fn = _schedule(ws, 2)
    x, w = torch.randn(5, 4), torch.randn(4, 3)
    graphs.graphed_call("rs", fn, (x,), (w,), ws)
    graphs.graphed_call("rs", fn, (x,), (w,), ws)
    ws.nbytes *= 2  # a bigger call elsewhere grew the buffer: the old graph points at freed memory
    graphs.graphed_call("rs", fn, (x,), (w,), ws)
    assert len(made) == 2 and made[0].replays == 1 and made[1].replays == 0


def test_a_first_call_that_grows_the_workspace_is_keyed_by_the_new_size(fake_capture):
    ws, made = fake_capture
    inner = _schedule(ws, 2)

    def fn(x, w):  # like symm.py's ensure(): the first call of a bigger shape grows the buffer
        ws.nbytes = max(ws.nbytes, 1 << 22)
        return inner(x, w)

    x, w = torch.randn(5, 4), torch.randn(4, 3)
    for _ in range(3):
        torch.testing.assert_close(graphs.graphed_call("ar", fn, (x,), (w,), ws), x @ w)
    assert len(made) == 1 and made[0].replays == 2


def test_weights_taking_turns_beyond_the_cache_go_eager_once_warned(fake_capture, monkeypatch):
    """A model's layers share a shape but not a weight: with more of them in turn than the
    cache holds, each graph is evicted before its layer comes again. After a few recaptures
    that kind runs eagerly (one warning) instead of capturing on every call; another kind
    keeps its graphs."""
    ws, made = fake_capture
    monkeypatch.setattr(graphs, "MAX_GRAPHS", 3)
    monkeypatch.setattr(graphs, "THRASH_RECAPTURES", 2)
    fn = _schedule(ws, 2)
    layers = [torch.randn(4, 3) for _ in range(5)]
    other_w, other_x = torch.randn(6, 2), torch.randn(5, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            for w in layers:
                x = torch.randn(5, 4)
                torch.testing.assert_close(graphs.graphed_call("rs", fn, (x,), (w,), ws), x @ w)
    thrash = [c for c in caught if "evicted before their weight comes round again" in str(c.message)]
    assert len(thrash) == 1 and "MAX_GRAPHS=3" in str(thrash[0].message)
    # 5 first captures, one recapture of an evicted graph; the second recapture (the limit)
    # sends the kind to eager, and nothing is captured after that.
    assert len(made) == 6
    assert ws.counter == 6 * 5 * 2
    # A kind of another shape is still captured and replayed.
    for _ in range(3):
        torch.testing.assert_close(graphs.graphed_call("rs", fn, (other_x,), (other_w,), ws), other_x @ other_w)
    assert len(made) == 7 and made[-1].replays == 2
    graphs.clear()
    assert not graphs._EAGER_KINDS and not graphs._CAPTURED


def test_a_thrashing_kind_runs_the_fallback_where_one_is_given(fake_capture, monkeypatch):
    """The plan's eager_fallback="sequential" reaches graphed_call as ``fallback``: once the
    kind goes eager, the fallback runs instead of the schedule (and advances no counter)."""
    ws, made = fake_capture
    monkeypatch.setattr(graphs, "MAX_GRAPHS", 2)
    monkeypatch.setattr(graphs, "THRASH_RECAPTURES", 1)
    fn = _schedule(ws, 2)
    plain_calls = []

    def plain(x, w):
        plain_calls.append(1)
        return x @ w

    layers = [torch.randn(4, 3) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            for w in layers:
                x = torch.randn(5, 4)
                torch.testing.assert_close(graphs.graphed_call("ag", fn, (x,), (w,), ws, fallback=plain), x @ w)
    # Round 1 captures all 4 (the first two are evicted). Round 2: layer 0 would be a recapture,
    # which reaches the limit (that call's eager run is its result, nothing captured); layer 1
    # runs the fallback; layers 2 and 3 still replay their cached graphs. Round 3: layers 0 and
    # 1 the fallback, 2 and 3 their graphs.
    assert len(made) == 4
    assert len(plain_calls) == 3
    assert [g.replays for g in made] == [0, 0, 2, 2]


def test_a_model_much_deeper_than_the_cache_is_caught_too(fake_capture, monkeypatch):
    """Recaptures are found however many other graphs were evicted in between."""
    ws, made = fake_capture
    monkeypatch.setattr(graphs, "MAX_GRAPHS", 2)
    monkeypatch.setattr(graphs, "THRASH_RECAPTURES", 3)
    fn = _schedule(ws, 2)
    layers = [torch.randn(4, 3) for _ in range(40)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            for w in layers:
                graphs.graphed_call("rs", fn, (torch.randn(5, 4),), (w,), ws)
    assert len(made) == 40 + 2  # the third recapture is refused; none after
    assert sum("evicted before their weight" in str(c.message) for c in caught) == 1
