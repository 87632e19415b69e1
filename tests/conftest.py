"""Shared test setup: GPU tests skip cleanly without CUDA."""

from __future__ import annotations

import kernels_env  # noqa: F401  (TRITON_INTERPRET=1 without CUDA, before anything imports triton)
import pytest
import torch

import pdserve  # noqa: F401  (GRPC_ENABLE_FORK_SUPPORT=false before any test module imports grpc)


def pytest_collection_modifyitems(config, items):
    have_cuda = torch.cuda.is_available()
    have_two = have_cuda and torch.cuda.device_count() >= 2
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_gpu2 = pytest.mark.skip(reason="needs two CUDA devices")
    for item in items:
        if "gpu" in item.keywords and not have_cuda:
            item.add_marker(skip_gpu)
        if "gpu2" in item.keywords and not have_two:
            item.add_marker(skip_gpu2)


@pytest.fixture(autouse=True)
def _cuda_device_restored():
    """A test that moved this process's current CUDA device (an engine built on cuda:1 sets
    it) must not move the next test's kernels and streams: put it back, and give back the
    blocks the caching allocator kept, after each test. Nothing happens without CUDA."""
    before = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
    yield
    if torch.cuda.is_initialized():
        import gc
        gc.collect()
        torch.cuda.set_device(before)
        torch.cuda.empty_cache()


# -- coordinator tests: fake workers on one background event loop ---------------------------
@pytest.fixture(scope="module")
def lt():
    from fake_worker import LoopThread
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture
def cluster_defaults() -> dict:
    """Keyword arguments every `make_cluster()` Cluster gets; a module may override it."""
    return {}


@pytest.fixture
def make_cluster(lt, cluster_defaults):
    from fake_worker import Cluster
    made: list[Cluster] = []

    def make(**kw) -> Cluster:
        made.append(Cluster(lt, **{**cluster_defaults, **kw}))
        return made[-1]

    yield make
    for c in made:
        c.stop()
