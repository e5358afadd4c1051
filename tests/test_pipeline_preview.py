"""Preview images (d3s2.pipelines.preview): camera conventions of the mesh render, panel fitting, composition and the
atomic PNG write."""

import numpy as np
import pytest
from PIL import Image

from d3s2.errors import D3S2Error
from d3s2.pipelines.preview import PreviewCamera, compose_preview, fit_panel, render_mesh_view, write_preview


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny CPU runs: 1 thread is faster on a busy machine


def _bar():
    import trimesh

    return trimesh.creation.box(extents=(1.6, 0.4, 0.4))  # long along x


def _width(alpha):
    cols = np.nonzero((alpha > 127).any(0))[0]
    return cols.max() - cols.min() + 1


def test_render_mesh_view_is_grey_shaded_and_follows_the_camera():
    front = render_mesh_view(_bar(), 64, PreviewCamera(elevation_deg=0.0, azimuth_deg=0.0))
    side = render_mesh_view(_bar(), 64, PreviewCamera(elevation_deg=0.0, azimuth_deg=90.0))
    assert front.shape == (64, 64, 4) and front.dtype == np.uint8
    a = front[..., 3]
    assert a[0, 0] == 0 and a[32, 32] == 255
    rgb = front[a == 255][:, :3].astype(int)
    assert np.all(rgb[:, 0] == rgb[:, 1]) and np.all(rgb[:, 1] == rgb[:, 2])  # plain grey
    # azimuth 0 looks along -z (x runs across the image), azimuth 90 along -x: the bar is long, then short
    assert _width(a) > 2.5 * _width(side[..., 3])
    three_quarter = render_mesh_view(_bar(), 64)  # default: elevation 20, azimuth 45 -> two lit sides differ
    shades = np.unique(three_quarter[three_quarter[..., 3] == 255][:, 0])
    assert len(shades) > 1


def test_render_mesh_view_rejects_empty_mesh():
    import trimesh

    with pytest.raises(D3S2Error, match="no faces"):
        render_mesh_view(trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64)), 32)


def test_fit_panel_crops_centres_and_composites_on_white():
    img = np.zeros((100, 200, 4), np.uint8)
    img[5:25, 10:30] = (255, 0, 0, 255)  # a 20 px red square in the top-left corner
    out = fit_panel(img, 50, margin=0.1)
    assert out.shape == (50, 50, 3)
    red = (out[..., 0] > 200) & (out[..., 1] < 60)
    ys, xs = np.nonzero(red)
    assert 38 <= xs.max() - xs.min() + 1 <= 41 and 38 <= ys.max() - ys.min() + 1 <= 41  # 80% of 50 px
    assert abs(xs.mean() - 24.5) < 1.0 and abs(ys.mean() - 24.5) < 1.0
    assert np.all(out[0, 0] == 255) and np.all(out[-1, -1] == 255)
    # without alpha: the whole image is kept
    rgb = np.full((10, 40, 3), 7, np.uint8)
    out = fit_panel(rgb, 40, margin=0.0)
    assert np.all(out[20, :] == 7) and np.all(out[0, 0] == 255)


def test_compose_and_write_preview(tmp_path):
    img = np.zeros((80, 80, 4), np.uint8)
    img[20:60, 30:50] = (0, 0, 255, 255)
    mesh_rgba = render_mesh_view(_bar(), 48)
    out = compose_preview(img, mesh_rgba, panel=48, labels=None)
    assert out.shape == (48, 96, 3)
    assert np.array_equal(out[:, :48], fit_panel(img, 48))
    assert np.array_equal(out[:, 48:], fit_panel(mesh_rgba, 48))
    path = tmp_path / "sub" / "a.preview.png"
    write_preview(path, img, _bar(), panel=48)
    back = np.asarray(Image.open(path))
    assert back.shape == (48, 96, 3)
    assert (back[:, :48, 2] > 200).any() and (back[:, :48, 0] < 60).any()  # the blue input on the left
    grey = back[:, 48:]
    assert ((grey[..., 0] < 230) & (grey[..., 0] == grey[..., 2])).sum() > 100  # a grey mesh on the right
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.preview.png"]
    # a failed preview leaves no file (and the old one untouched)
    import trimesh

    with pytest.raises(D3S2Error):
        write_preview(tmp_path / "sub" / "b.preview.png", img, trimesh.Trimesh(np.zeros((0, 3)),
                                                                               np.zeros((0, 3), np.int64)), panel=48)
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.preview.png"]
