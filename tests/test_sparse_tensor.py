import pytest
import torch

from d3s2.errors import D3S2Error
from d3s2.sparse import SparseConv3d, SparseTensor, neighbor_map
from sparse_helpers import random_sparse


def test_duplicate_coordinates_rejected():
    coords = torch.tensor([[0, 1, 2, 3], [0, 4, 4, 4], [0, 1, 2, 3]])
    with pytest.raises(D3S2Error, match="duplicate"):
        SparseTensor(torch.zeros(3, 2), coords)
    # same xyz in different samples is fine
    coords[2, 0] = 1
    x = SparseTensor(torch.zeros(3, 2), coords)
    assert x.batch_size == 2


@pytest.mark.parametrize(
    "feats,coords,kwargs,match",
    [
        (torch.zeros(2, 1), torch.zeros(2, 3, dtype=torch.int64), {}, r"\[N, 4\]"),
        (torch.zeros(2, 1), torch.zeros(2, 4), {}, "integer"),
        (torch.zeros(3, 1), torch.zeros(2, 4, dtype=torch.int64), {}, "rows"),
        (torch.zeros(1, 1), torch.tensor([[0, -1, 0, 0]]), {}, "non-negative"),
        (torch.zeros(1, 1), torch.tensor([[2, 0, 0, 0]]), {"batch_size": 2}, "batch index"),
        (torch.zeros(1, 1), torch.tensor([[0, 8, 0, 0]]), {"resolution": 8}, "resolution"),
    ],
)
def test_bad_input_clear_errors(feats, coords, kwargs, match):
    with pytest.raises(D3S2Error, match=match):
        SparseTensor(feats, coords, **kwargs)


def test_rows_sorted_by_batch_features_follow():
    coords = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 1], [1, 2, 2, 2], [0, 3, 3, 3]])
    feats = torch.arange(4.0).unsqueeze(1)
    x = SparseTensor(feats, coords)
    assert x.coords[:, 0].tolist() == [0, 0, 1, 1]
    assert x.feats[:, 0].tolist() == [1.0, 3.0, 0.0, 2.0]  # stable: order inside a sample kept
    assert x.batch_offsets.tolist() == [0, 2, 4]
    assert x.shape == torch.Size([2, 1]) and x.num_voxels == 4


def test_dense_round_trip_and_empty_sample():
    x, mask = random_sparse([0.3, 0.0, 0.1], 6, 3)
    assert x.batch_counts.tolist()[1] == 0
    d = x.to_dense()
    assert d.shape == (3, 3, 6, 6, 6)
    assert torch.equal((d != 0).any(1), mask)
    y = SparseTensor.from_dense(d, mask)
    assert torch.equal(y.to_dense(), d)
    assert y.batch_offsets.tolist() == x.batch_offsets.tolist()


def test_cat_split_round_trip():
    a, _ = random_sparse([0.2, 0.3], 5, 2)
    b, _ = random_sparse([0.0, 0.25], 5, 2, generator=torch.Generator().manual_seed(3))
    c = SparseTensor.cat([a, b])
    assert c.batch_size == 4
    assert torch.equal(c.to_dense(), torch.cat([a.to_dense(), b.to_dense()]))
    parts = c.split()
    assert len(parts) == 4 and parts[2].num_voxels == 0
    for p, ref in zip(parts, [*a.split(), *b.split()]):
        assert torch.equal(p.coords, ref.coords) and torch.equal(p.feats, ref.feats)
        assert p.batch_size == 1


def test_replace_shares_neighbour_maps_and_to_dtype():
    x, _ = random_sparse([0.3], 6, 4)
    m1, _ = neighbor_map(x, 3)
    y = x.replace(x.feats * 2)
    m2, _ = neighbor_map(y, 3)
    assert m1 is m2  # built once per coordinate set
    z = x.to(torch.float32)
    assert z.dtype == torch.float32 and neighbor_map(z, 3)[0] is m1
    # a conv output keeps the input coordinates and the cache
    out = SparseConv3d(4, 5).double()(x)
    assert neighbor_map(out, 3)[0] is m1
    with pytest.raises(D3S2Error):
        x.replace(torch.zeros(x.num_voxels + 1, 4))


def test_elementwise_needs_same_coordinates():
    x, _ = random_sparse([0.3], 6, 2)
    y = x + x.replace(torch.ones_like(x.feats))
    assert torch.allclose(y.feats, x.feats + 1)
    other, _ = random_sparse([0.3], 6, 2, generator=torch.Generator().manual_seed(9))
    with pytest.raises(D3S2Error):
        _ = x + other


def test_empty_tensor():
    x = SparseTensor(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.int32), batch_size=2, resolution=4)
    assert x.batch_offsets.tolist() == [0, 0, 0]
    y = SparseConv3d(3, 2)(x)
    assert y.feats.shape == (0, 2)
    assert x.to_dense().shape == (2, 3, 4, 4, 4)
