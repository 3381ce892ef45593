import os
import zlib

import pytest
import torch

# Triton runs on CPU tensors only through its interpreter, which must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pyclloss.backends import backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def fused_backends(device: str):
    """The fused backends that run on ``device`` here."""
    names = ("cuda", "triton") if device == "cuda" else ("cpp", "triton")
    return [n for n in names if backends()[n].available]


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


# Fresh random inputs on every run; PYCLLOSS_TEST_SEED reproduces a failure.
SEED = int(os.environ.get("PYCLLOSS_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    return f"pyclloss test seed: PYCLLOSS_TEST_SEED={SEED}"


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SEED + zlib.crc32(request.node.nodeid.encode()))
