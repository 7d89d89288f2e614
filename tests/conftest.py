import os
import random

import pytest
import torch

DATA_DIR = os.environ.get(
    "RECOPT_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    yield


@pytest.fixture
def data_dir():
    return DATA_DIR
