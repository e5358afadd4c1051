"""Renderer and camera tests (paper Sec. 5.1 renders): silhouettes, depth, textures, coverage, determinism, ranges."""

import math

import numpy as np
import pytest
import torch

trimesh = pytest.importorskip("trimesh")
from PIL import Image  # noqa: E402
from scipy.spatial import ConvexHull  # noqa: E402

from d3s2.data.render import (  # noqa: E402
    Renderer,
    RenderMesh,
    RenderPart,
    RenderSettings,
    load_render_mesh,
    render_mesh_from_trimesh,
    render_views,
)
from d3s2.errors import D3S2Error  # noqa: E402
from d3s2.geometry.cameras import Camera, CameraSampling, fit_distance, sample_cameras  # noqa: E402
from d3s2.geometry.raster import rasterize  # noqa: E402


def _front_camera(distance=4.0, focal_mm=36.0, resolution=32):
    # elevation 0, azimuth 0: camera on +z looking at the origin, image x = world +x, image y = world -y
    return Camera(elevation_deg=0.0, azimuth_deg=0.0, focal_mm=focal_mm, distance=distance, resolution=resolution)


def _quad(x0, x1, y0, y1, z=0.0):
    v = np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], np.float32)
    f = np.array([[0, 1, 2], [0, 2, 3]], np.int64)
    return v, f


def _convex_silhouette(vertices, cam, size):
    """Analytic reference: pinhole-project the vertices (numpy, independent of the rasteriser) and fill their hull."""
    K = cam.intrinsics(size)
    w2c = np.linalg.inv(cam.c2w)
    pc = vertices @ w2c[:3, :3].T + w2c[:3, 3]
    uv = (pc @ K.T)[:, :2] / pc[:, 2:3]
    hull = ConvexHull(uv)
    jj, ii = np.mgrid[0:size, 0:size]
    pts = np.stack([ii.ravel() + 0.5, jj.ravel() + 0.5], 1)
    inside = (pts @ hull.equations[:, :2].T + hull.equations[:, 2] <= 0).all(1)
    return inside.reshape(size, size)


@pytest.mark.parametrize("shape", ["sphere", "cube"])
def test_silhouette_matches_analytic_projection(shape):
    if shape == "sphere":
        tm = trimesh.creation.icosphere(subdivisions=3, radius=0.8)
    else:
        tm = trimesh.creation.box(extents=(1.2, 0.9, 1.4))
    mesh = render_mesh_from_trimesh(tm)
    cams = sample_cameras(mesh.bounding_radius(), 80, CameraSampling(num_views=3), seed=3)
    r = Renderer(mesh, RenderSettings(size=80, supersample=1))
    for cam in cams:
        out = r.render(cam)
        mask = out.alpha.numpy() > 0
        ref = _convex_silhouette(np.asarray(tm.vertices), cam, 80)
        iou = (mask & ref).sum() / (mask | ref).sum()
        assert iou > 0.98, iou
        assert (mask ^ ref).sum() <= 2  # in practice pixel-exact: only exact ties at pixel centres may differ
        # whole object in view: nothing touches the image border
        assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()


def test_depth_of_front_facing_and_tilted_plane():
    size = 40
    K = torch.tensor([[30.0, 0, 20], [0, 30.0, 20], [0, 0, 1]])
    v, f = _quad(-1, 1, -1, 1, z=3.0)
    frag = rasterize(torch.as_tensor(v), torch.as_tensor(f), K, size, size)
    covered = frag.face >= 0
    expect = torch.zeros(size, size, dtype=torch.bool)
    expect[10:30, 10:30] = True  # u = 30 x / 3 + 20 spans [10, 30]
    assert torch.equal(covered, expect)
    assert torch.allclose(frag.depth[covered], torch.full_like(frag.depth[covered], 3.0), rtol=1e-6)
    assert torch.isinf(frag.depth[~covered]).all()

    # tilted plane z = 3 + 0.5 x: depth along the ray through each pixel centre is 3 / (1 - 0.5 * xn)
    v = np.array([[-1, -1, 2.5], [1, -1, 3.5], [1, 1, 3.5], [-1, 1, 2.5]], np.float32)
    frag = rasterize(torch.as_tensor(v), torch.as_tensor(f), K, size, size)
    covered = (frag.face >= 0).numpy()
    jj, ii = np.mgrid[0:size, 0:size]
    xn = (ii + 0.5 - 20) / 30.0
    expect = 3.0 / (1.0 - 0.5 * xn)
    np.testing.assert_allclose(frag.depth.numpy()[covered], expect[covered], rtol=1e-5)


def test_depth_test_keeps_nearest_surface():
    near_v, f = _quad(-1, 1, -1, 1, z=2.0)
    far_v, _ = _quad(-4, 4, -4, 4, z=-3.0)
    for order in (0, 1):  # the result must not depend on the face order
        parts = [
            RenderPart(far_v, f, base_color=np.array([0, 0, 1.0])),
            RenderPart(near_v, f, base_color=np.array([1.0, 0, 0])),
        ]
        if order:
            parts = parts[::-1]
        mesh = RenderMesh(parts)
        cam = Camera(elevation_deg=0, azimuth_deg=0, focal_mm=36, distance=6.0, resolution=32)
        out = Renderer(mesh, RenderSettings(size=32, supersample=1, shading="unlit")).render(cam)
        rgb = out.rgb.numpy()
        # centre pixel: the near red quad (world z=2 is 4 from the camera); the blue one only outside it
        np.testing.assert_allclose(rgb[16, 16], [1, 0, 0], atol=1e-6)
        assert out.depth[32 // 2, 32 // 2] == pytest.approx(4.0, rel=1e-6)
        np.testing.assert_allclose(rgb[16, 4], [0, 0, 1], atol=1e-6)
        assert out.depth[16, 4] == pytest.approx(9.0, rel=1e-6)


def test_texture_lookup_on_textured_quad():
    # 8x8 texture: four 4x4 blocks, row 0 = top of the image
    tex = np.zeros((8, 8, 3), np.uint8)
    tex[:4, :4] = (255, 0, 0)
    tex[:4, 4:] = (0, 255, 0)
    tex[4:, :4] = (0, 0, 255)
    tex[4:, 4:] = (255, 255, 0)
    v, f = _quad(-1, 1, -1, 1)
    uv = (v[:, :2] + 1) / 2  # (0, 0) at the bottom-left corner, v up
    material = trimesh.visual.material.SimpleMaterial(image=Image.fromarray(tex))
    tm = trimesh.Trimesh(v, f, visual=trimesh.visual.TextureVisuals(uv=uv, material=material), process=False)
    mesh = render_mesh_from_trimesh(tm)
    assert mesh.parts[0].texture is not None
    cam = _front_camera(distance=4.0, focal_mm=36.0, resolution=32)  # quad spans pixels 8..24
    out = Renderer(mesh, RenderSettings(size=32, supersample=2, shading="unlit")).render(cam)
    rgb = out.rgb.numpy()
    expect = {(11, 11): (1, 0, 0), (11, 20): (0, 1, 0), (20, 11): (0, 0, 1), (20, 20): (1, 1, 0)}
    for (row, col), colour in expect.items():
        np.testing.assert_allclose(rgb[row, col], colour, atol=1e-5, err_msg=f"pixel {(row, col)}")
    # across the block boundary bilinear filtering blends the two blocks
    assert 0.2 < rgb[11, 16, 0] < 0.8 and 0.2 < rgb[11, 16, 1] < 0.8


def test_glb_scene_with_two_materials(tmp_path):
    # a textured quad (left) and a face-coloured quad (right) in one GLB scene: per-part materials survive loading
    tex = np.zeros((8, 8, 3), np.uint8)
    tex[:, :4] = (255, 0, 0)
    tex[:, 4:] = (0, 255, 0)
    v, f = _quad(-1, 0, -0.5, 0.5)
    uv = np.stack([(v[:, 0] + 1), v[:, 1] + 0.5], 1)
    pbr = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(tex))
    left = trimesh.Trimesh(v, f, visual=trimesh.visual.TextureVisuals(uv=uv, material=pbr), process=False)
    v2, f2 = _quad(0.1, 1, -0.5, 0.5)
    right = trimesh.Trimesh(v2, f2, process=False)
    right.visual.face_colors = [0, 0, 255, 255]
    trimesh.Scene([left, right]).export(tmp_path / "scene.glb")
    mesh = load_render_mesh(tmp_path / "scene.glb")
    assert len(mesh.parts) == 2 and sum(p.texture is not None for p in mesh.parts) == 1
    cam = _front_camera(distance=4.0, resolution=32)  # u = 8 x + 16, v = -8 y + 16
    rgb = Renderer(mesh, RenderSettings(size=32, supersample=2, shading="unlit")).render(cam).rgb.numpy()
    np.testing.assert_allclose(rgb[16, 9], (1, 0, 0), atol=2 / 255)  # x = -0.875: left half of the texture
    np.testing.assert_allclose(rgb[16, 14], (0, 1, 0), atol=2 / 255)  # x = -0.25: right half
    np.testing.assert_allclose(rgb[16, 21], (0, 0, 1), atol=2 / 255)  # face colour of the second part


def test_vertex_colours_plain_material_and_lambert():
    tm = trimesh.creation.icosphere(subdivisions=2, radius=0.7)
    tm.visual.vertex_colors = np.tile([[0, 128, 255, 255]], (len(tm.vertices), 1))
    mesh = render_mesh_from_trimesh(tm)
    assert mesh.parts[0].vertex_colors is not None
    cam = _front_camera(distance=3.0, resolution=32)
    unlit = Renderer(mesh, RenderSettings(size=32, supersample=1, shading="unlit")).render(cam)
    m = unlit.alpha.numpy() > 0
    np.testing.assert_allclose(unlit.rgb.numpy()[m], np.tile([0, 128 / 255, 1], (m.sum(), 1)), atol=1e-5)

    plain = render_mesh_from_trimesh(trimesh.creation.icosphere(subdivisions=2, radius=0.7))
    assert plain.parts[0].is_plain
    s = RenderSettings(size=32, supersample=1, shading="lambert", ambient=0.3)
    lit = Renderer(plain, s).render(cam).rgb.numpy()
    grey = np.asarray(s.plain_color)
    # Lambert: between ambient and full intensity, grey (equal channels), brighter where the normal faces the light
    assert (lit[m] <= grey + 1e-5).all() and (lit[m] >= 0.3 * grey - 1e-5).all()
    np.testing.assert_allclose(lit[m][:, 0], lit[m][:, 2], atol=1e-6)
    assert lit[13, 13, 0] > lit[19, 19, 0]  # light from the upper left


def test_alpha_is_exact_coverage():
    # final pixel u = 8 x + 16 (focal 32 px at 32 px, distance 4): x in [-1, 0.5625] -> u in [8, 20.5]
    v, f = _quad(-1.0, 0.5625, -1.0, 1.0)
    mesh = RenderMesh([RenderPart(v, f)])
    cam = _front_camera(distance=4.0, focal_mm=36.0, resolution=32)
    out = Renderer(mesh, RenderSettings(size=32, supersample=2)).render(cam)
    alpha = out.alpha.numpy()
    expect = np.zeros((32, 32))
    expect[8:24, 8:20] = 1.0
    expect[8:24, 20] = 0.5
    np.testing.assert_array_equal(alpha, expect)
    rgba = out.rgba_uint8()
    assert rgba.dtype == np.uint8 and rgba.shape == (32, 32, 4)
    assert set(np.unique(rgba[..., 3]).tolist()) == {0, 128, 255}
    # straight alpha: the half-covered column keeps the full surface colour
    np.testing.assert_allclose(out.rgb.numpy()[12, 20], out.rgb.numpy()[12, 12], atol=1e-5)


def test_render_is_deterministic_and_npz_roundtrip(tmp_path):
    tm = trimesh.creation.torus(0.6, 0.25, major_sections=24, minor_sections=12)
    mesh = render_mesh_from_trimesh(tm)
    cams = sample_cameras(mesh.bounding_radius(), 48, CameraSampling(num_views=2), seed=11)
    s = RenderSettings(size=48, supersample=2, max_pairs=4099)  # tiny chunks: exercise the chunked depth test
    a = render_views(mesh, cams, s)
    b = render_views(mesh, sample_cameras(mesh.bounding_radius(), 48, CameraSampling(num_views=2), seed=11), s)
    c = render_views(mesh, cams, RenderSettings(size=48, supersample=2))
    mesh.save_npz(tmp_path / "m.npz")
    d = render_views(RenderMesh.load_npz(tmp_path / "m.npz"), cams, s)
    for x, y, z, w in zip(a, b, c, d):
        assert x[..., 3].max() == 255
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
        np.testing.assert_array_equal(x, w)
    assert not np.array_equal(a[0], a[1])


def test_camera_ranges_and_geometry():
    s = CameraSampling(num_views=300)
    cams = sample_cameras(1.3, 518, s, seed=5)
    e = np.array([c.elevation_deg for c in cams])
    a = np.array([c.azimuth_deg for c in cams])
    fm = np.array([c.focal_mm for c in cams])
    assert e.min() >= 10 and e.max() <= 40 and e.max() - e.min() > 25
    assert a.min() >= 0 and a.max() <= 180 and a.max() - a.min() > 160
    assert fm.min() >= 30 and fm.max() <= 100 and fm.max() - fm.min() > 60
    for c in cams[:20]:
        eye = c.c2w[:3, 3]
        assert np.linalg.norm(eye) == pytest.approx(c.distance)
        assert math.degrees(math.asin(eye[1] / c.distance)) == pytest.approx(c.elevation_deg)
        assert math.degrees(math.atan2(eye[0], eye[2])) % 360 == pytest.approx(c.azimuth_deg)
        np.testing.assert_allclose(c.c2w[:3, 2], -eye / c.distance, atol=1e-12)  # looks at the origin
        K = c.intrinsics()
        assert 2 * math.degrees(math.atan(259 / K[0, 0])) == pytest.approx(2 * math.degrees(math.atan(18 / c.focal_mm)))
        assert c.distance == pytest.approx(fit_distance(1.3, c.focal_mm))
        j = c.to_json()
        assert Camera.from_json(j).c2w == pytest.approx(c.c2w)
        assert np.allclose(np.array(j["c2w_opengl"])[:3, 2], eye / c.distance)
    assert [c.elevation_deg for c in sample_cameras(1.3, 518, s, seed=5)] == list(e)
    assert [c.elevation_deg for c in sample_cameras(1.3, 518, s, seed=6)] != list(e)


def test_bad_meshes_raise_clear_errors():
    with pytest.raises(D3S2Error, match="no faces"):
        render_mesh_from_trimesh(trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), int)))
    with pytest.raises(D3S2Error, match="point cloud"):
        render_mesh_from_trimesh(trimesh.PointCloud(np.random.rand(10, 3)))
    v, f = _quad(-1, 1, -1, 1)
    v[0, 0] = np.nan
    with pytest.raises(D3S2Error, match="non-finite"):
        RenderMesh([RenderPart(v, f)]).validate()


@pytest.mark.gpu
def test_cuda_matches_cpu():
    tm = trimesh.creation.icosphere(subdivisions=3, radius=0.8)
    mesh = render_mesh_from_trimesh(tm)
    cams = sample_cameras(mesh.bounding_radius(), 64, CameraSampling(num_views=2), seed=0)
    s = RenderSettings(size=64)
    for x, y in zip(render_views(mesh, cams, s, "cpu"), render_views(mesh, cams, s, "cuda")):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
