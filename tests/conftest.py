import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Intra-op threads: the machine's cores (2 at most) shared among the pytest-xdist workers. Two workers of two
# OpenMP threads each on 2 cores spin against each other (the load issue 21 measured): the suite took 23% longer.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def svd_tiny():
    from fxstream.models import build_unet, example_inputs
    unet = build_unet("svd-tiny")
    return unet, example_inputs("svd-tiny", unet)


@pytest.fixture(scope="session")
def animatediff_tiny():
    from fxstream.models import build_unet, example_inputs
    unet = build_unet("animatediff-tiny")
    return unet, example_inputs("animatediff-tiny", unet)
