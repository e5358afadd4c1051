"""RGBA renders of a mesh for the DiT's image conditions (paper Sec. 5.1: 45 random views per mesh).

Why our own rasteriser: the renders must come out headless on a CPU-only machine and on a GPU server with nothing but
PyTorch installed (no GL, EGL, OSMesa or Vulkan loaders, no system packages, no compiled extensions of ours). A
vectorised z-buffer rasteriser in plain PyTorch runs the same code on CPU and CUDA and is exact enough to test against
analytic projections. pyrender works with EGL on some machines but needs system libraries that a plain `pip install`
does not bring, so it is not used.

How it works (one view):

1. Project the vertices with the pinhole camera (OpenCV frame, see d3s2.data.cameras). Faces with a vertex closer than
   ``near`` are culled (the cameras of d3s2 always sit outside the object's bounding sphere, so none are).
2. Per face, the pixel bounding box of its screen triangle. Every (face, pixel-in-box) pair is one candidate; pairs are
   generated in chunks of at most ``max_pairs`` so memory stays bounded whatever the triangle sizes.
3. Barycentrics by edge functions, set up per face relative to its box origin (small numbers, so float32 is accurate)
   at pixel centres. Faces are double sided. Inverse depth is affine in screen space, so the depth of a pair is exact.
4. Depth test: a key ``(float bits of depth) << 32 | face`` per inside pair and one ``scatter_reduce(amin)`` per
   chunk into a per-pixel key buffer (positive float bits order like the floats, so the smallest key is the nearest
   face; ties go to the lower face index, deterministic on any device).
5. Shading only on the winning pixels: perspective-correct barycentrics, interpolated UV / vertex colour / normal,
   bilinear texture lookup (repeat wrap), Lambert + ambient with a light near the camera.
6. Antialiasing: render at ``size * supersample`` and box-filter down; alpha is the exact covered fraction of the
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

from d3s2.data.cameras import Camera
from d3s2.errors import D3S2Error
from d3s2.fileio import atomic_open

_KEY_EMPTY = torch.iinfo(torch.int64).max


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
# Device-side buffers


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


# ----------------------------------------------------------------------------------------------------------------------
# Rasteriser


@dataclass
class Fragments:
    """Per-pixel result of rasterisation: nearest face (-1: background) and its camera-space depth (inf: background)."""

    face: torch.Tensor  # [H, W] int64
    depth: torch.Tensor  # [H, W] float32
    setup: torch.Tensor  # [F, 12] per-face barycentric / inverse-depth planes (see _face_setup)
    origin: torch.Tensor  # [F, 2] int64 pixel origin of each face's box


def _face_setup(p: torch.Tensor, invz: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """Affine planes of the three barycentrics and of 1/z over pixel offsets (dx, dy) from the face's box origin.

    Row layout: [c0, a0, b0, c1, a1, b1, c2, a2, b2, cz, az, bz] so that b_i = c_i + a_i*dx + b_i*dy at the pixel centre
    (origin + (dx, dy) + 0.5). Computed in float64 and stored in float32.
    """
    p = p.double()
    o = origin.double() + 0.5
    q = p - o[:, None, :]  # vertices relative to the first pixel centre of the box
    x, y = q[..., 0], q[..., 1]
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (y[:, 1] - y[:, 0]) * (x[:, 2] - x[:, 0])
    inv_area = 1.0 / area
    cols = []
    for i in range(3):
        j, k = (i + 1) % 3, (i + 2) % 3
        # edge function of edge (j, k) evaluated at (dx, dy): opposite vertex i gets weight 1
        a = -(y[:, k] - y[:, j])
        b = x[:, k] - x[:, j]
        c = (x[:, k] - x[:, j]) * (0 - y[:, j]) - (y[:, k] - y[:, j]) * (0 - x[:, j])
        cols += [c * inv_area, a * inv_area, b * inv_area]
    bary = torch.stack(cols, dim=1).view(-1, 3, 3)  # [F, 3 (vertex), 3 (c, a, b)]
    z = (bary * invz.double()[:, :, None]).sum(1)  # 1/z is affine in screen space: same combination of the planes
    return torch.cat([bary.reshape(-1, 9), z], dim=1).float()


def rasterize(
    verts_cam: torch.Tensor,
    faces: torch.Tensor,
    K: torch.Tensor,
    height: int,
    width: int,
    near: float = 1e-4,
    max_pairs: int | None = None,
    eps: float = 1e-6,
) -> Fragments:
    """Z-buffer rasterisation of triangles given in OpenCV camera coordinates (x right, y down, z forward).

    Pixel (i, j) covers [i, i+1) x [j, j+1) and is sampled at its centre. Returns the nearest face per pixel.
    """
    device = verts_cam.device
    if max_pairs is None:
        max_pairs = 1 << 24 if device.type == "cuda" else 1 << 21
    K = K.to(device=device, dtype=torch.float32)
    z = verts_cam[:, 2]
    zs = z.clamp_min(near)
    u = K[0, 0] * verts_cam[:, 0] / zs + K[0, 2]
    v = K[1, 1] * verts_cam[:, 1] / zs + K[1, 2]
    scr = torch.stack([u, v], dim=1)[faces]  # [F, 3, 2]
    zf = z[faces]
    valid = (zf > near).all(1) & torch.isfinite(scr).all(2).all(1)
    lo = scr.amin(1)
    hi = scr.amax(1)
    i0 = torch.ceil(lo[:, 0] - 0.5).clamp(0, width).long()
    i1 = torch.floor(hi[:, 0] - 0.5).clamp(-1, width - 1).long()
    j0 = torch.ceil(lo[:, 1] - 0.5).clamp(0, height).long()
    j1 = torch.floor(hi[:, 1] - 0.5).clamp(-1, height - 1).long()
    bw = (i1 - i0 + 1).clamp_min(0)
    bh = (j1 - j0 + 1).clamp_min(0)
    origin = torch.stack([i0, j0], dim=1)
    setup = _face_setup(scr, 1.0 / zf.clamp_min(near), origin)
    valid &= torch.isfinite(setup).all(1)
    count = torch.where(valid, bw * bh, torch.zeros_like(bw))

    keys = torch.full((height * width,), _KEY_EMPTY, dtype=torch.int64, device=device)
    sel = torch.nonzero(count > 0).squeeze(1)
    if sel.numel():
        cnt = count[sel]
        cum = torch.cumsum(cnt, 0).cpu()
        # chunks of whole faces with at most max_pairs candidates (a single larger face gets a chunk of its own)
        bounds, start, n = [], 0, len(sel)
        while start < n:
            before = int(cum[start - 1]) if start else 0
            end = int(torch.searchsorted(cum, before + max_pairs, right=True))
            end = max(end, start + 1)
            bounds.append((start, end, int(cum[end - 1]) - before))
            start = end
        # one gather per pair from compact per-face tables (gathers dominate the cost on CPU)
        itab_all = torch.stack([i0, j0, bw], dim=1)
        for s, e, total in bounds:
            f = sel[s:e]
            c = cnt[s:e]
            local_face = torch.repeat_interleave(torch.arange(e - s, device=device), c, output_size=total)
            itab = torch.cat([itab_all[f], (torch.cumsum(c, 0) - c)[:, None], f[:, None]], dim=1)[local_face]
            st = setup[f][local_face].view(-1, 4, 3)
            local = torch.arange(total, device=device) - itab[:, 3]
            dy = torch.div(local, itab[:, 2], rounding_mode="floor")
            dx = local - dy * itab[:, 2]
            # planes (3 barycentrics, 1/z) evaluated at (dx, dy): c + a*dx + b*dy
            vals = st[:, :, 0] + st[:, :, 1] * dx.float()[:, None] + st[:, :, 2] * dy.float()[:, None]
            inside = torch.nonzero(((vals[:, :3] >= -eps).all(1) & (vals[:, 3] > 0))).squeeze(1)
            if inside.numel() == 0:
                continue
            it = itab[inside]
            pix = (it[:, 1] + dy[inside]) * width + (it[:, 0] + dx[inside])
            depth = 1.0 / vals[inside, 3]
            key = (depth.view(torch.int32).long() << 32) | it[:, 4]
            keys.scatter_reduce_(0, pix, key, reduce="amin", include_self=True)
    empty = keys == _KEY_EMPTY
    face = torch.where(empty, torch.full_like(keys, -1), keys & 0xFFFFFFFF)
    depth = torch.where(empty, torch.zeros_like(keys), keys >> 32).int().view(torch.float32)
    depth = torch.where(empty, torch.full_like(depth, math.inf), depth)
    return Fragments(face.view(height, width), depth.view(height, width), setup, origin)


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
