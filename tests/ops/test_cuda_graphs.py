"""StaticCall's capture: the garbage collector is paused while a CUDA graph is being captured.

A collection inside a capture that frees a dead graph invalidates the capture (CUDA forbids the graph's destructor
there; ops/cuda_graphs.py). CUDA's capture calls are replaced by recorders here, so the CPU suite checks the
collector's state at the moment the capture would run, and the result plumbing around it.
"""

import contextlib
import gc

import torch

from atlas_train.ops import cuda_graphs


class _Recorder:
    """Stands in for torch.cuda's stream and graph objects; notes the collector's state when a capture begins."""

    collector_during_capture: list[bool] = []

    def wait_stream(self, other):
        pass

    def replay(self):
        pass


@contextlib.contextmanager
def _recording_graph(graph, pool=None, capture_error_mode=None):
    _Recorder.collector_during_capture.append(gc.isenabled())
    yield


def test_capture_pauses_the_garbage_collector_and_restores_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Stream", _Recorder)
    monkeypatch.setattr(torch.cuda, "current_stream", _Recorder)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Recorder)
    monkeypatch.setattr(torch.cuda, "graph", _recording_graph)
    _Recorder.collector_during_capture = []
    assert gc.isenabled()
    call = cuda_graphs.StaticCall(lambda x: [2 * x], [torch.ones(3)], graph=True)
    assert _Recorder.collector_during_capture == [False]
    assert gc.isenabled()
    assert torch.equal(call.outputs[0], torch.full((3,), 2.0))


def test_collector_paused_keeps_a_disabled_collector_disabled():
    gc.disable()
    try:
        with cuda_graphs.collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
