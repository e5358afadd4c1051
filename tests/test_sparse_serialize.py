import pytest
import torch

from d3s2.errors import D3S2Error
from d3s2.sparse import serialize_blocks, window_partition
from sparse_helpers import random_sparse


@pytest.fixture
def coords():
    x, _ = random_sparse([0.2, 0.0, 0.05, 0.3], 19, 1)  # 19: not a multiple of the block; an empty sample
    return x.coords


def test_block_layout_round_trip_and_contiguity(coords):
    lay = serialize_blocks(coords, block_size=8, sub_block_size=4, batch_size=4)
    n = coords.shape[0]
    assert torch.equal(torch.sort(lay.perm).values, torch.arange(n))
    assert torch.equal(coords[lay.perm][lay.inverse], coords)
    s = coords[lay.perm].long()
    blk = torch.cat([s[:, :1], s[:, 1:] // 8], 1)
    # every block is one contiguous run with the coordinates stored for it
    for j in range(lay.num_blocks):
        a, b = lay.block_offsets[j], lay.block_offsets[j + 1]
        assert b > a
        assert torch.equal(blk[a:b], lay.block_coords[j].expand(b - a, 4))
    assert torch.equal(lay.token_block, torch.repeat_interleave(torch.arange(lay.num_blocks), lay.block_sizes()))
    # blocks never repeat (contiguity), and 4^3 sub-blocks are contiguous inside their block
    key = blk[:, 0] * 10**6 + blk[:, 1] * 10**4 + blk[:, 2] * 100 + blk[:, 3]
    assert torch.unique_consecutive(key).numel() == lay.num_blocks
    sub = torch.cat([blk, (s[:, 1:] % 8) // 4], 1)
    subkey = (sub * torch.tensor([10**8, 10**6, 10**4, 100, 9, 3, 1])).sum(1)
    assert torch.unique_consecutive(subkey).numel() == torch.unique(subkey).numel()
    # samples in order; the empty sample owns no blocks
    assert lay.batch_offsets.tolist()[1] == lay.batch_offsets.tolist()[2]
    assert torch.all(lay.block_coords[1:, 0] >= lay.block_coords[:-1, 0])


@pytest.mark.parametrize("shift", [0, 4])
def test_window_membership(coords, shift):
    wp = window_partition(coords, 8, shift=shift, batch_size=4)
    s = coords[wp.perm].long()
    win = torch.cat([s[:, :1], (s[:, 1:] + shift) // 8], 1)
    assert torch.equal(coords[wp.perm][wp.inverse], coords)
    seen = set()
    for w in range(wp.num_windows):
        a, b = wp.offsets[w], wp.offsets[w + 1]
        ids = win[a:b]
        assert torch.equal(ids, ids[:1].expand(b - a, 4))  # one window per run
        key = tuple(ids[0].tolist())
        assert key not in seen
        seen.add(key)
    assert wp.offsets[-1] == coords.shape[0]


def test_serialize_rejects_duplicates_and_bad_windows():
    c = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]])
    with pytest.raises(D3S2Error, match="duplicate"):
        serialize_blocks(c)
    with pytest.raises(D3S2Error):
        window_partition(c[:1], 8, shift=8)
