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


@pytest.fixture(scope="session")
def stories3(tmp_path_factory, data_dir) -> Path:
    """stories260k prepared by hand: RTN 3-bit, group size 32, with cheatsheet and thresholds."""
    from decdec.resolve import load_original
    from helpers import prepare_by_hand
    model, tokenizer, _ = load_original("stories260k", data_dir=data_dir)
    out = tmp_path_factory.mktemp("stories3")
    prepare_by_hand(model, out, bits=3, group_size=32, tokenizer=tokenizer)
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
