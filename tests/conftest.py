import os
import random

import torch

# Triton chooses interpreter mode when it is first imported: without a GPU,
# set it before any test module imports triton, so kernel tests run on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

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
