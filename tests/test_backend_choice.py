"""backend="auto" on a GPU takes the backend measured fastest on the card model
(triton_kernels/tuned.json), then the family's order."""

import importlib

import torch

from pyclloss.triton_kernels import tuning

backends = importlib.import_module("pyclloss.backends")  # the module, not pyclloss.backends()

CUDA = torch.device("cuda")


def _pretend_gpu(monkeypatch, table):
    monkeypatch.setattr(tuning, "_tuned", lambda: table)
    monkeypatch.setattr(tuning, "card_key", lambda device=None: "some-gpu")
    monkeypatch.setattr(backends, "_availability",
                        lambda name: backends.Availability(True, "pretended"))
    monkeypatch.setattr(backends, "_runs_on", lambda name, device: True)


def test_auto_takes_the_measured_backend(monkeypatch):
    table = {"some-gpu": {"auto": {"info_nce": {"bfloat16": {"512": "triton"},
                                                 "float32-tf32x3": {"512": "cuda"}}}}}
    _pretend_gpu(monkeypatch, table)
    order = ("cpp", "cuda", "triton", "reference")
    resolve = backends.resolve
    assert resolve("auto", CUDA, order, family="info_nce", dtype=torch.bfloat16,
                   size=512) == "triton"
    # the nearest measured size stands for an unmeasured one
    assert resolve("auto", CUDA, order, family="info_nce", dtype=torch.bfloat16,
                   size=1000) == "triton"
    # TF32 off (the default): the fp32 entry of that precision
    assert resolve("auto", CUDA, order, family="info_nce", dtype=torch.float32,
                   size=512) == "cuda"
    # nothing measured for the precision or the family: the family's order
    assert resolve("auto", CUDA, order, family="info_nce", dtype=torch.float16,
                   size=512) == "cuda"
    assert resolve("auto", CUDA, order, family="gated", dtype=torch.bfloat16,
                   size=512) == "cuda"
    # an explicit backend is never overridden
    assert resolve("cuda", CUDA, order, family="info_nce", dtype=torch.bfloat16,
                   size=512) == "cuda"


def test_the_recorded_sorting_choice_is_triton_on_the_h200():
    tuning._tuned.cache_clear()
    assert tuning.preferred_backend("sorting", torch.bfloat16, 32, card="nvidia-h200") == "triton"
    assert tuning.preferred_backend("sorting", torch.float32, 32, card="nvidia-h200") in (
        "triton", None)
