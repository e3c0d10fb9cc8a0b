import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # These tests run many small ops: with two threads on a shared 2-core box, OpenMP's spinning made them ~50x slower
    # (a crop test: 69 s with two threads, 1.3 s with one, under a load of ~4).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
