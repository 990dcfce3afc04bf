"""The NVRx baseline hooks of the scenario harness never end the job they observe."""

from commflow.monitor.scenario import Scenario, _nvrx, _nvrx_report


class _Report:
    def identify_stragglers(self):
        return {"straggler_gpu_rel": {type("Id", (), {"rank": 2})()}, "straggler_section_rel": {"compute": set()}}


class _Detector:
    def __init__(self, fail: bool):
        self.fail = fail

    def generate_report(self):
        if self.fail:
            raise AssertionError("Torch not compiled with CUDA enabled")
        return _Report()


def test_cpu_scenarios_do_not_start_nvrx():
    out: dict = {}
    sc = Scenario(world=2, iterations=10, compute_ms=1.0, nbytes=64, faults=[], seed=0, device="cpu", nvrx_every=5)
    assert _nvrx(sc, out) is None
    assert "need CUDA" in out["nvrx_error"]


def test_a_failing_report_is_recorded_and_stops_the_reports():
    out: dict = {}
    assert _nvrx_report(_Detector(fail=False), 9, out)
    assert out["nvrx"][0]["iteration"] == 9 and out["nvrx"][0]["stragglers"] == [2]
    assert not _nvrx_report(_Detector(fail=True), 14, out)
    assert out["nvrx_error"].startswith("AssertionError: Torch not compiled with CUDA")
    assert len(out["nvrx"]) == 1
