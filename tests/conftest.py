import os

import pytest
import torch

# Two cores on CI: keep every test on the same small thread budget, and deterministic.
torch.set_num_threads(int(os.environ.get("SEGMERGE_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
