"""One intra-op thread for this part's tests.

Every tensor here is tiny; on a shared 2-core box, torch's thread pool spends far more
time handing them between threads than computing (a 100x slowdown measured under
load), so the tests pin one thread and restore the setting afterwards.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
