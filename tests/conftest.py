import os
import zlib

import pytest
import torch

from helpers import HAS_CUDA  # also picks the Triton interpreter without CUDA


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


# Fresh random inputs on every run; PYCLLOSS_TEST_SEED reproduces a failure.
SEED = int(os.environ.get("PYCLLOSS_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    return f"pyclloss test seed: PYCLLOSS_TEST_SEED={SEED}"


def pytest_terminal_summary(terminalreporter, exitstatus):
    # Also under -q, which hides the header: a failure can be rerun as it was.
    if exitstatus != 0:
        terminalreporter.write_line(f"rerun with PYCLLOSS_TEST_SEED={SEED}")


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SEED + zlib.crc32(request.node.nodeid.encode()))
