"""The all-reduce's pull step: the plain form on CPU, the switch, and where the kernel is refused."""

import pytest
import torch

from commflow.overlap import peer_pull, symm


@pytest.mark.parametrize("world,rank", [(2, 0), (4, 1), (4, 3)])
def test_reference_fills_every_peer_block_and_leaves_the_own_one(world, rank):
    rows, n = 3, 8
    buffers = {p: torch.full((rows, n), float(p + 1)) for p in range(world)}
    dst = torch.full((world * rows, n), -1.0)
    peer_pull.pull_reference(dst, lambda p: buffers[p], rank, world, rows)
    for p in range(world):
        block = dst[p * rows:(p + 1) * rows]
        assert torch.equal(block, torch.full_like(block, -1.0 if p == rank else float(p + 1)))


def test_kernel_is_refused_off_cuda_and_for_partial_words():
    assert not peer_pull.supported(torch.zeros(8, 8, dtype=torch.bfloat16), 4, 0)
    meta = torch.empty(8, 6, dtype=torch.bfloat16, device="meta")  # 6 bf16 per row: not whole 8-byte words
    assert not peer_pull.supported(meta, 4, 0)


def test_pull_ctas_switch_checks_its_argument():
    before = symm.pull_ctas()
    try:
        symm.set_pull_ctas(16)
        assert symm.pull_ctas() == 16
        for bad in (-1, 2.5, True, "16"):
            with pytest.raises(ValueError, match="ctas must be an int >= 0"):
                symm.set_pull_ctas(bad)
        assert symm.pull_ctas() == 16
    finally:
        symm.set_pull_ctas(before)
