"""Shared test setup: GPU tests skip cleanly without CUDA."""

from __future__ import annotations

import kernels_env  # noqa: F401  (TRITON_INTERPRET=1 without CUDA, before anything imports triton)
import pytest
import torch


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
