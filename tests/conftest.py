import importlib.util
import os
import warnings

import pytest
import torch

torch.set_num_threads(int(os.environ.get("EVTRACE_TEST_THREADS", "2")))
warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="module")
def one_thread():
    """For files of tiny models: they gain nothing from intra-op threads, and on shared, busy
    cores every op then waits for a descheduled thread (measured 8x slower with 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def timm():
    """Real timm (tests/timm_setup.py: why torchvision needs help to import beside a CPU torch);
    the test is skipped where timm is not installed (``./dev`` installs it)."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (./dev installs it)")
    from tests.timm_setup import import_timm

    return import_timm()
