import pytest
import torch

from tests.deprecations import raise_deprecations_caused_by_hf_dare


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP workers waiting on each
    other make many small ops orders of magnitude slower: train on one thread, then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def deprecations_caused_by_hf_dare_fail():
    """A FutureWarning / DeprecationWarning (or transformers' logged deprecation) that transformers or torch raise
    because of hf-dare's own calls is an error (tests/deprecations.py): the next removal shows before it lands."""
    with raise_deprecations_caused_by_hf_dare():
        yield
