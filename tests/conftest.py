import os
from pathlib import Path

import pytest
import torch

from decdec.resolve import find_data_dir


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA and the compiled extension (skipped otherwise)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    import decdec
    if decdec.cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA and the compiled decdec._C extension")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = find_data_dir()
    if root is None:
        pytest.skip("no data directory (set DECDEC_DATA or place ../shared/data)")
    return root


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
