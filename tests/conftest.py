import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP workers waiting on each
    other make many small ops orders of magnitude slower: train on one thread, then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
