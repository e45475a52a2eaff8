"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """Run a module on one torch thread, then restore the thread count.

    The tiny models' matrices are too small to gain from intra-op threads, and on a busy two-core machine the threads
    wait on each other. One thread also fixes the reduction order, which bitwise comparisons between runs need.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
