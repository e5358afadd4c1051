"""RGBA renders of a mesh for the DiT's image conditions (paper Sec. 5.1: 45 random views per mesh).

Why our own rasteriser: the renders must come out headless on a CPU-only machine and on a GPU server with nothing but
PyTorch installed (no GL, EGL, OSMesa or Vulkan loaders, no system packages, no compiled extensions of ours). A
vectorised z-buffer rasteriser in plain PyTorch runs the same code on CPU and CUDA and is exact enough to test against
analytic projections. pyrender works with EGL on some machines but needs system libraries that a plain `pip install`
does not bring, so it is not used.

How it works (one view): the z-buffer rasteriser of ``d3s2.geometry.raster`` (projection with the pinhole camera of
``d3s2.geometry.cameras``, per-face pixel boxes in bounded chunks, edge-function barycentrics, one ``amin`` depth test
per chunk) finds the nearest face of every pixel, then:

1. Shading only on the winning pixels: perspective-correct barycentrics, interpolated UV / vertex colour / normal,
   bilinear texture lookup (repeat wrap), Lambert + ambient with a light near the camera.
2. Antialiasing: render at ``size * supersample`` and box-filter down; alpha is the exact covered fraction of the
   sub-samples, colour is the alpha-weighted mean of the covered sub-samples (straight, not premultiplied, alpha).

Material rules: glTF PBR base colour texture x base colour factor; OBJ/MTL diffuse texture (map_Kd) alone, else the
diffuse colour (Kd); per-vertex or per-face colours; a plain light grey when the mesh carries no colour at all. Texture
alpha and transparency modes are ignored: alpha is the object mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from d3s2.errors import D3S2Error
from d3s2.fileio import atomic_open
from d3s2.geometry.cameras import Camera
from d3s2.geometry.raster import rasterize


# ----------------------------------------------------------------------------------------------------------------------
# Mesh with materials


@dataclass
class RenderPart:
    """One geometry with one material. Colours are floats in [0, 1]; texture is uint8 [H, W, 3]."""

    vertices: np.ndarray  # [V, 3] float
    faces: np.ndarray  # [F, 3] int
    uv: np.ndarray | None = None  # [V, 2], v up (OBJ / trimesh convention)
    texture: np.ndarray | None = None  # [H, W, 3] uint8, row 0 = top of the image
    vertex_colors: np.ndarray | None = None  # [V, 3]
    face_colors: np.ndarray | None = None  # [F, 3]
    base_color: np.ndarray | None = None  # [3]; None and nothing else given: the plain material

    @property
    def is_plain(self) -> bool:
        return (
            self.texture is None and self.vertex_colors is None and self.face_colors is None and self.base_color is None
        )


@dataclass
class RenderMesh:
    """A renderable mesh: parts (each with its own material) in one world frame."""

    parts: list[RenderPart] = field(default_factory=list)

    @property
    def num_faces(self) -> int:
        return sum(len(p.faces) for p in self.parts)

    @property
    def num_vertices(self) -> int:
        return sum(len(p.vertices) for p in self.parts)

    def validate(self) -> "RenderMesh":
        if self.num_faces == 0:
            raise D3S2Error("mesh has no faces (empty mesh or point cloud): nothing to render")
        for p in self.parts:
            if len(p.faces) and not np.isfinite(p.vertices).all():
                raise D3S2Error("mesh has non-finite (NaN/inf) vertex coordinates: repair or drop it")
            if len(p.faces) and (p.faces.min() < 0 or p.faces.max() >= len(p.vertices)):
                raise D3S2Error("mesh has face indices outside its vertex list: the file is corrupt")
        return self

    def transformed(self, scale: float, offset) -> "RenderMesh":
        """Copy with every vertex mapped to ``v * scale + offset`` (the normalisation of d3s2.data)."""
        off = np.asarray(offset, dtype=np.float64).reshape(1, 3)
        parts = []
        for p in self.parts:
            q = RenderPart(**{k: getattr(p, k) for k in p.__dataclass_fields__})
            q.vertices = (np.asarray(p.vertices, dtype=np.float64) * scale + off).astype(np.float32)
            parts.append(q)
        return RenderMesh(parts)

    def used_vertices(self) -> np.ndarray:
        vs = [np.asarray(p.vertices)[np.unique(p.faces)] for p in self.parts if len(p.faces)]
        return np.concatenate(vs) if vs else np.zeros((0, 3), np.float32)

    def bounding_radius(self, center=(0.0, 0.0, 0.0)) -> float:
        v = self.used_vertices()
        if len(v) == 0:
            raise D3S2Error("mesh has no faces (empty mesh or point cloud): nothing to render")
        return float(np.linalg.norm(v - np.asarray(center), axis=1).max())

    # -- portable storage (no trimesh needed to read it back, e.g. on a GPU server) -----------------------------------
    def save_npz(self, path: str | Path) -> None:
        arrays = {"num_parts": np.array(len(self.parts))}
        for i, p in enumerate(self.parts):
            for k in p.__dataclass_fields__:
                val = getattr(p, k)
                if val is not None:
                    arrays[f"p{i}_{k}"] = np.asarray(val)
        np.savez_compressed(path, **arrays)

    @classmethod
    def load_npz(cls, path: str | Path) -> "RenderMesh":
        with np.load(path) as z:
            parts = []
            for i in range(int(z["num_parts"])):
                kw = {k: (z[f"p{i}_{k}"] if f"p{i}_{k}" in z else None) for k in RenderPart.__dataclass_fields__}
                parts.append(RenderPart(**kw))
        return cls(parts)


def _color3(c) -> np.ndarray | None:
    if c is None:
        return None
    a = np.asarray(c)
    a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 or a.max(initial=0) > 1.0 else a.astype(np.float32)
    return a[..., :3]


def _image_array(img) -> np.ndarray | None:
    if img is None:
        return None
    try:
        from PIL import Image

        if isinstance(img, Image.Image):
            arr = np.asarray(img.convert("RGB"))
        else:
            arr = np.asarray(img)
    except Exception:  # an unreadable texture: fall back to the material colour rather than failing the mesh
        return None
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        return None
    if arr.dtype != np.uint8:
        arr = np.clip(arr.astype(np.float32) * (255.0 if arr.max(initial=0) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


def _part_from_trimesh(m) -> RenderPart:
    v = np.asarray(m.vertices, dtype=np.float32)
    f = np.asarray(m.faces, dtype=np.int64).reshape(-1, 3)
    part = RenderPart(vertices=v, faces=f)
    vis = getattr(m, "visual", None)
    kind = getattr(vis, "kind", None)
    if kind == "texture":
        mat = getattr(vis, "material", None)
        uv = getattr(vis, "uv", None)
        img = getattr(mat, "baseColorTexture", None)
        factor = getattr(mat, "baseColorFactor", None)
        if img is None and hasattr(mat, "image"):
            img = mat.image  # OBJ / MTL map_Kd: the texture alone, Kd is not multiplied in (as Blender imports it)
        tex = _image_array(img)
        if tex is not None and uv is not None and len(uv) == len(v):
            part.uv = np.asarray(uv, dtype=np.float32)
            part.texture = tex
            part.base_color = _color3(factor)
        elif mat is not None:
            part.base_color = _color3(getattr(mat, "main_color", None))
    elif kind == "vertex":
        part.vertex_colors = _color3(vis.vertex_colors)
    elif kind == "face":
        part.face_colors = _color3(vis.face_colors)
    return part


def render_mesh_from_trimesh(obj) -> RenderMesh:
    """Convert a trimesh Trimesh or Scene (flattened with its transforms, materials kept per geometry)."""
    import trimesh

    if isinstance(obj, trimesh.Scene):
        geoms = [g for g in obj.dump(concatenate=False) if isinstance(g, trimesh.Trimesh)]
    elif isinstance(obj, trimesh.Trimesh):
        geoms = [obj]
    else:
        raise D3S2Error(f"not a triangle mesh ({type(obj).__name__}, e.g. a point cloud): nothing to render")
    return RenderMesh([_part_from_trimesh(g) for g in geoms if len(g.faces)]).validate()


def load_render_mesh(path: str | Path) -> RenderMesh:
    """Load a mesh file with its materials for rendering (obj, glb, gltf, ply, stl, off; any format trimesh reads)."""
    import trimesh

    try:
        obj = trimesh.load(str(path), force="scene")
    except Exception as exc:
        raise D3S2Error(f"cannot read mesh {path}: {type(exc).__name__}: {exc}") from exc
    return render_mesh_from_trimesh(obj)


# ----------------------------------------------------------------------------------------------------------------------
# Device-side buffers and texture lookup


@dataclass
class _DeviceMesh:
    verts: torch.Tensor  # [V, 3] float32
    faces: torch.Tensor  # [F, 3] int64
    vnormals: torch.Tensor  # [V, 3]
    fnormals: torch.Tensor  # [F, 3]
    face_part: torch.Tensor  # [F] int64
    uv: torch.Tensor  # [V, 2]
    vcolor: torch.Tensor  # [V, 3]
    fcolor: torch.Tensor  # [F, 3]
    part_color: torch.Tensor  # [P, 3]
    textures: list  # per part: uint8 [H, W, 3] tensor or None


def _to_device(mesh: RenderMesh, device, plain_color) -> _DeviceMesh:
    vs, fs, uvs, vcs, fcs, fps, pcs, texs = [], [], [], [], [], [], [], []
    base = 0
    for i, p in enumerate(mesh.parts):
        nv, nf = len(p.vertices), len(p.faces)
        vs.append(np.asarray(p.vertices, np.float32))
        fs.append(np.asarray(p.faces, np.int64) + base)
        uvs.append(
            np.asarray(p.uv, np.float32)
            if p.uv is not None and p.texture is not None
            else np.zeros((nv, 2), np.float32)
        )
        vcs.append(
            np.asarray(p.vertex_colors, np.float32)[:, :3]
            if p.vertex_colors is not None
            else np.ones((nv, 3), np.float32)
        )
        fcs.append(
            np.asarray(p.face_colors, np.float32)[:, :3] if p.face_colors is not None else np.ones((nf, 3), np.float32)
        )
        fps.append(np.full(nf, i, np.int64))
        if p.is_plain:
            pcs.append(np.asarray(plain_color, np.float32))
        else:
            pcs.append(np.asarray(p.base_color, np.float32)[:3] if p.base_color is not None else np.ones(3, np.float32))
        texs.append(
            torch.as_tensor(np.array(p.texture, np.uint8), device=device)
            if p.texture is not None and p.uv is not None
            else None
        )
        base += nv
    verts = torch.as_tensor(np.concatenate(vs), device=device)
    faces = torch.as_tensor(np.concatenate(fs), device=device)
    tri = verts[faces]
    fn = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=1)  # area-weighted
    vn = torch.zeros_like(verts).index_add_(0, faces.reshape(-1), fn.repeat_interleave(3, dim=0))
    return _DeviceMesh(
        verts=verts,
        faces=faces,
        vnormals=F.normalize(vn, dim=1),
        fnormals=F.normalize(fn, dim=1),
        face_part=torch.as_tensor(np.concatenate(fps), device=device),
        uv=torch.as_tensor(np.concatenate(uvs), device=device),
        vcolor=torch.as_tensor(np.concatenate(vcs), device=device).clamp(0, 1),
        fcolor=torch.as_tensor(np.concatenate(fcs), device=device).clamp(0, 1),
        part_color=torch.as_tensor(np.stack(pcs), device=device).clamp(0, 1),
        textures=texs,
    )


def _bilinear_repeat(tex: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup with repeat wrap. tex uint8 [H, W, C]; uv [N, 2] with v up. Returns float [N, C] in [0, 1]."""
    H, W = tex.shape[:2]
    x = uv[:, 0] * W - 0.5
    y = (1.0 - uv[:, 1]) * H - 0.5
    x0 = torch.floor(x)
    y0 = torch.floor(y)
    fx = (x - x0)[:, None]
    fy = (y - y0)[:, None]
    x0 = x0.long()
    y0 = y0.long()
    flat = tex.reshape(H * W, -1)

    def at(yy, xx):
        return flat[(yy % H) * W + (xx % W)].float()

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bot = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return (top * (1 - fy) + bot * fy) / 255.0


# ----------------------------------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class RenderSettings:
    """Image size and shading. ``supersample`` sub-samples per pixel side for antialiasing (alpha = coverage)."""

    size: int = 518
    supersample: int = 2
    shading: str = "lambert"  # "lambert" (ambient + diffuse headlight) or "unlit" (base colour only)
    ambient: float = 0.3
    light_dir: tuple[float, float, float] = (-0.3, -0.5, -1.0)  # towards the light, camera frame (OpenCV)
    plain_color: tuple[float, float, float] = (0.75, 0.75, 0.75)
    crease_cos: float = math.cos(math.radians(45.0))  # smooth normals unless they bend more than this off the face
    max_pairs: int | None = None

    def __post_init__(self):
        if self.size < 1 or self.supersample < 1:
            raise ValueError("RenderSettings: size and supersample must be >= 1")
        if self.shading not in ("lambert", "unlit"):
            raise ValueError(f"RenderSettings.shading must be 'lambert' or 'unlit', got {self.shading!r}")


@dataclass
class RenderResult:
    """Float outputs at the final size: rgb [H, W, 3] (straight alpha), alpha [H, W] = covered fraction.

    ``depth`` / ``face`` are at the supersampled size (camera-space z / face index; inf / -1 on the background).
    """

    rgb: torch.Tensor
    alpha: torch.Tensor
    depth: torch.Tensor
    face: torch.Tensor

    def rgba_uint8(self) -> np.ndarray:
        rgba = torch.cat([self.rgb, self.alpha[..., None]], dim=-1)
        return (rgba.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()


class Renderer:
    """Renders one mesh from many cameras; the mesh is uploaded to ``device`` once."""

    def __init__(self, mesh: RenderMesh, settings: RenderSettings = RenderSettings(), device="cpu"):
        self.settings = settings
        self.device = torch.device(device)
        self.mesh = _to_device(mesh.validate(), self.device, settings.plain_color)

    @torch.no_grad()
    def render(self, camera: Camera) -> RenderResult:
        s = self.settings
        m = self.mesh
        hi = s.size * s.supersample
        K = torch.as_tensor(camera.intrinsics(hi), dtype=torch.float32, device=self.device)
        w2c = torch.as_tensor(camera.w2c, dtype=torch.float32, device=self.device)
        R, t = w2c[:3, :3], w2c[:3, 3]
        vc = m.verts @ R.T + t
        frag = rasterize(vc, m.faces, K, hi, hi, max_pairs=s.max_pairs)

        face = frag.face.reshape(-1)
        pix = torch.nonzero(face >= 0).squeeze(1)
        f = face[pix]
        rgb = torch.zeros(hi * hi, 3, device=self.device)
        if pix.numel():
            st = frag.setup[f]
            dx = (pix % hi - frag.origin[f, 0]).float()
            dy = (pix // hi - frag.origin[f, 1]).float()
            b = torch.stack([st[:, 3 * i] + st[:, 3 * i + 1] * dx + st[:, 3 * i + 2] * dy for i in range(3)], 1)
            b = b.clamp_min(0)
            iz_v = 1.0 / vc[:, 2][m.faces[f]]  # [N, 3]
            pc = b * iz_v
            pc = pc / pc.sum(1, keepdim=True).clamp_min(1e-30)  # perspective-correct barycentrics
            tri = m.faces[f]

            def interp(attr):
                return (attr[tri] * pc[..., None]).sum(1)

            part = m.face_part[f]
            color = m.part_color[part] * m.fcolor[f] * interp(m.vcolor)
            for p, tex in enumerate(m.textures):
                if tex is None:
                    continue
                sel = torch.nonzero(part == p).squeeze(1)
                if sel.numel():
                    uv = (m.uv[tri[sel]] * pc[sel][..., None]).sum(1)
                    color[sel] = color[sel] * _bilinear_repeat(tex, uv)
            if s.shading == "lambert":
                fn = m.fnormals[f] @ R.T
                n = F.normalize(interp(m.vnormals), dim=1) @ R.T
                n = torch.where(((n * fn).sum(1, keepdim=True) < s.crease_cos), fn, n)
                pos = (vc[tri] * pc[..., None]).sum(1)
                flip = (n * pos).sum(1, keepdim=True) > 0  # double sided: face the normal towards the camera
                n = torch.where(flip, -n, n)
                light = F.normalize(torch.tensor(s.light_dir, dtype=torch.float32, device=self.device), dim=0)
                lam = (n @ light).clamp_min(0)[:, None]
                color = color * (s.ambient + (1.0 - s.ambient) * lam)
            rgb[pix] = color.clamp(0, 1)

        cover = (face >= 0).float().view(1, 1, hi, hi)
        rgb_img = rgb.T.reshape(1, 3, hi, hi) * cover
        if s.supersample > 1:
            k = s.supersample
            cover_lo = F.avg_pool2d(cover, k)
            rgb_lo = F.avg_pool2d(rgb_img, k) / cover_lo.clamp_min(1e-12)
        else:
            cover_lo, rgb_lo = cover, rgb_img
        return RenderResult(
            rgb=rgb_lo[0].permute(1, 2, 0).contiguous(),
            alpha=cover_lo[0, 0],
            depth=frag.depth,
            face=frag.face,
        )

    def render_rgba(self, cameras: list[Camera]) -> list[np.ndarray]:
        return [self.render(c).rgba_uint8() for c in cameras]


def render_views(
    mesh: RenderMesh, cameras: list[Camera], settings: RenderSettings = RenderSettings(), device="cpu"
) -> list[np.ndarray]:
    """RGBA uint8 images [size, size, 4] of ``mesh`` from each camera."""
    return Renderer(mesh, settings, device).render_rgba(cameras)


def save_png(path: str | Path, rgba: np.ndarray, compress_level: int = 3) -> None:
    """Write an RGBA PNG atomically (temporary file in the same folder, then os.replace)."""
    from PIL import Image

    with atomic_open(path, "wb") as fh:
        Image.fromarray(rgba, mode="RGBA").save(fh, format="PNG", compress_level=compress_level)


def write_views(renderer: Renderer, cameras: list[Camera], item_dir: str | Path, threads: int = 0) -> list[dict]:
    """Render every camera into ``item_dir/renders/NNN.png``; returns the per-view records for cameras.json.

    ``threads > 0`` encodes PNGs in a thread pool while the next view renders (worth it when rendering on a GPU; PNG
    compression releases the GIL).
    """
    from concurrent.futures import ThreadPoolExecutor

    item_dir = Path(item_dir)
    (item_dir / "renders").mkdir(parents=True, exist_ok=True)
    views = []
    pool = ThreadPoolExecutor(threads) if threads > 0 else None
    futures = []
    try:
        for k, cam in enumerate(cameras):
            name = f"renders/{k:03d}.png"
            rgba = renderer.render(cam).rgba_uint8()
            if pool is None:
                save_png(item_dir / name, rgba)
            else:
                futures.append(pool.submit(save_png, item_dir / name, rgba))
            views.append({"file": name, "index": k, **cam.to_json()})
        for f in futures:
            f.result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return views
