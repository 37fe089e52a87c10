import os
import warnings

import pytest
import torch

torch.set_num_threads(int(os.environ.get("EVTRACE_TEST_THREADS", "2")))
warnings.filterwarnings("ignore", category=DeprecationWarning)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: full-size models or long streams")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
