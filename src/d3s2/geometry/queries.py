"""Closest-point and winding-number queries on a triangle mesh, with two interchangeable back ends.

- ``CpuQueries``: libigl (AABB tree closest points in float64; fast generalised winding number of Barill et al. 2018,
  robust to holes and self-intersections).
- ``WarpQueries``: NVIDIA warp (``wp.Mesh`` BVH; ``mesh_query_point_no_sign`` /
  ``mesh_query_point_sign_winding_number``) on ``"cuda"`` or ``"cpu"`` (the warp CPU path is single-threaded: tests
  only).

Both answer the same questions so that the sparse-SDF code above them is written once:
``unsigned_distance(points, upper_bound)``, ``closest(points, upper_bound)`` (distance and closest face, for the
pseudo-normal sign of ``d3s2.geometry.pseudo_normal``) and ``inside(points)`` (generalised winding number > 1/2).
``WarpQueries`` also answers ``closest_torch`` on device tensors (the GPU narrow band of ``d3s2.data.sdf_band`` stays
on the GPU). warp works in float32: its distances are recomputed in float64 from the closest face it found, so both
back ends decide band membership (``d < tau``) on float64 distances.
Distances at or beyond ``upper_bound`` are returned as ``inf``: the band code only needs to know they are too far, and a
bounded search is several times faster.
"""

from __future__ import annotations

import numpy as np

from d3s2.errors import D3S2Error

__all__ = [
    "CpuQueries",
    "WarpQueries",
    "make_queries",
    "resolve_backend",
    "warp_cuda_available",
    "winding_fallback",
    "winding_factory",
]

_CHUNK = 1 << 22  # points per call: bounds the memory of the per-point outputs (closest points etc.)
_FAR = 1e30


def warp_cuda_available() -> bool:
    """warp-lang importable and a CUDA device visible (asks PyTorch first, so CPU machines never start warp's CUDA
    probe, which prints driver warnings)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
    except ImportError:
        pass
    try:
        import warp as wp
    except ImportError:
        return False
    try:
        wp.config.quiet = True
        wp.init()
        return wp.get_cuda_device_count() > 0
    except Exception:
        return False


def resolve_backend(backend: str = "auto", device: str | None = None) -> tuple[str, str | None]:
    """``"auto"`` -> warp on CUDA when a GPU and warp-lang are present, else libigl on the CPU.

    Returns ``(backend, device)`` with backend in {"cpu", "warp"}; device is the warp device (``"cuda"``/``"cpu"``...).
    """
    if backend not in ("auto", "cpu", "warp"):
        raise D3S2Error(f"unknown SDF backend {backend!r}; use 'auto', 'cpu' or 'warp'")
    if backend == "auto":
        if device is not None and str(device).startswith("cuda"):
            backend = "warp"
        elif device is None and warp_cuda_available():
            backend, device = "warp", "cuda"
        else:
            backend = "cpu"
    if backend == "warp":
        try:
            import warp  # noqa: F401
        except ImportError as exc:
            raise D3S2Error("backend 'warp' needs warp-lang: `pip install warp-lang` (or use backend='cpu')") from exc
        if device is None:
            device = "cuda" if warp_cuda_available() else "cpu"
    return backend, device


class CpuQueries:
    """libigl queries (multi-threaded C++) on one mesh; float64."""

    def __init__(self, vertices: np.ndarray, faces: np.ndarray):
        try:
            import igl
        except ImportError as exc:
            raise D3S2Error("backend 'cpu' needs libigl: `pip install libigl` (or the d3s2[data] extra)") from exc
        self._igl = igl
        self.V = np.ascontiguousarray(vertices, dtype=np.float64)
        self.F = np.ascontiguousarray(faces, dtype=np.int64)

    def _sd(self, points, sign_type, upper_bound):
        igl = self._igl
        points = np.ascontiguousarray(points, dtype=np.float64).reshape(-1, 3)
        out = np.empty(len(points), dtype=np.float64)
        ub = float("inf") if upper_bound is None else float(upper_bound)
        for s in range(0, len(points), _CHUNK):
            d, _, _, _ = igl.signed_distance(points[s : s + _CHUNK], self.V, self.F, sign_type, upper_bound=ub)
            out[s : s + _CHUNK] = d
        if upper_bound is not None:
            out[np.abs(out) >= ub] = np.inf
        return out

    def unsigned_distance(self, points: np.ndarray, upper_bound: float | None = None) -> np.ndarray:
        if len(points) == 0:
            return np.zeros(0)
        return np.abs(self._sd(points, self._igl.SignedDistanceType.SIGNED_DISTANCE_TYPE_UNSIGNED, upper_bound))

    def closest(self, points: np.ndarray, upper_bound: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(distance float64 [N] (inf at or beyond ``upper_bound``), closest face int64 [N] (-1 there))."""
        igl = self._igl
        points = np.ascontiguousarray(points, dtype=np.float64).reshape(-1, 3)
        d = np.empty(len(points), dtype=np.float64)
        face = np.empty(len(points), dtype=np.int64)
        ub = float("inf") if upper_bound is None else float(upper_bound)
        unsigned = igl.SignedDistanceType.SIGNED_DISTANCE_TYPE_UNSIGNED
        for s in range(0, len(points), _CHUNK):
            dd, ii, _, _ = igl.signed_distance(points[s : s + _CHUNK], self.V, self.F, unsigned, upper_bound=ub)
            d[s : s + _CHUNK] = np.abs(dd)
            face[s : s + _CHUNK] = ii
        far = d >= ub
        d[far] = np.inf
        face[far] = -1
        return d, face

    def pseudo_normal_tables(self):
        if getattr(self, "_tables", None) is None:
            from d3s2.geometry.pseudo_normal import build_tables

            self._tables = build_tables(self.V, self.F, "cpu")
        return self._tables

    def winding_number(self, points: np.ndarray) -> np.ndarray:
        points = np.ascontiguousarray(points, dtype=np.float64).reshape(-1, 3)
        out = np.empty(len(points), dtype=np.float64)
        for s in range(0, len(points), _CHUNK):
            out[s : s + _CHUNK] = self._igl.fast_winding_number(self.V, self.F, points[s : s + _CHUNK])
        return out

    def inside(self, points: np.ndarray, max_dist: float | None = None) -> np.ndarray:
        """Winding number > 1/2 (``max_dist``: unused here, see WarpQueries.inside)."""
        if len(points) == 0:
            return np.zeros(0, dtype=bool)
        return self.winding_number(points) > 0.5


def _torch_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _warp_kernels():
    from d3s2.geometry.warp_kernels import kernels

    return kernels()


class WarpQueries:
    """warp BVH queries (float32) on one mesh, on ``device`` ("cuda", "cuda:0", "cpu"). The winding-number tables are
    built on the first :meth:`inside` call (:meth:`winding_mesh`)."""

    def __init__(
        self,
        vertices: np.ndarray,
        faces: np.ndarray,
        device: str = "cuda",
        winding_accuracy: float = 2.0,
        transfer: str = "auto",
    ):
        import warp as wp

        wp.config.quiet = True
        wp.init()
        self._wp = wp
        self.device = device
        if transfer not in ("auto", "torch", "warp"):
            raise D3S2Error(f"unknown transfer {transfer!r}; use 'auto', 'torch' or 'warp'")
        if transfer == "auto":  # host<->GPU copies through PyTorch (a d3s2 dependency) on CUDA, warp's own otherwise
            transfer = "torch" if str(device).startswith("cuda") and _torch_cuda() else "warp"
        self.transfer = transfer
        self.accuracy = float(winding_accuracy)
        self._kernels = _warp_kernels()
        self.V = np.ascontiguousarray(vertices, dtype=np.float64)
        self.F = np.ascontiguousarray(faces, dtype=np.int64).reshape(-1, 3)
        self._tables = None
        self._mesh_tensors = None
        self._winding_mesh = None
        self.mesh = self._build_mesh(support_winding=False)

    def _build_mesh(self, support_winding: bool):
        wp = self._wp
        return wp.Mesh(
            points=wp.array(np.ascontiguousarray(self.V, dtype=np.float32), dtype=wp.vec3, device=self.device),
            indices=wp.array(np.ascontiguousarray(self.F, dtype=np.int32).reshape(-1), dtype=wp.int32,
                             device=self.device),
            support_winding_number=support_winding,
        )

    def winding_mesh(self):
        """The BVH with winding-number tables, built on the first sign query only: the tables cost seconds on
        million-face meshes (12 s of the pipeline's 1024 band at 1.2 M faces) and distances never need them (the SDF
        code signs with pseudo-normals and asks libigl for the few ambiguous points when it is installed)."""
        if self._winding_mesh is None:
            self._winding_mesh = self._build_mesh(support_winding=True)
        return self._winding_mesh

    def _run(self, kernel, points, args, out_dtype, mesh=None):
        wp = self._wp
        mesh_id = (mesh or self.mesh).id
        points = np.ascontiguousarray(points, dtype=np.float32).reshape(-1, 3)
        n = len(points)
        np_dtype = np.float32 if out_dtype is float else np.int32
        if n == 0:
            return np.zeros(0, dtype=np_dtype)
        chunk = 1 << 24 if self.device != "cpu" else _CHUNK
        res = []
        for s in range(0, n, chunk):
            if self.transfer == "torch":
                import torch

                dev = torch.device(self.device)
                pt = torch.from_numpy(points[s : s + chunk]).to(dev)
                ot = torch.empty(len(pt), dtype=torch.float32 if out_dtype is float else torch.int32, device=dev)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                p = wp.from_torch(pt, dtype=wp.vec3)
                o = wp.from_torch(ot)
                wp.launch(kernel, dim=len(pt), inputs=[mesh_id, p, *args, o], device=self.device)
                wp.synchronize_device(self.device)
                res.append(ot.cpu().numpy())
            else:
                p = wp.array(points[s : s + chunk], dtype=wp.vec3, device=self.device)
                o = wp.empty(len(p), dtype=out_dtype, device=self.device)
                wp.launch(kernel, dim=len(p), inputs=[mesh_id, p, *args, o], device=self.device)
                res.append(o.numpy())
        return np.concatenate(res)

    @property
    def torch_device(self):
        import torch

        return torch.device(str(self.device))

    def pseudo_normal_tables(self):
        """Float64 mesh + pseudo-normal tables on the query device (built once)."""
        if self._tables is None:
            from d3s2.geometry.pseudo_normal import build_tables

            self._tables = build_tables(self.V, self.F, self.torch_device)
        return self._tables

    def mesh_tensors(self):
        """Float64 vertices [V, 3] and int64 faces [F, 3] on the query device: all that distances need (the
        pseudo-normal tables add a host-side vertex merge, ~1 s on a 1M-face mesh, that only signs need)."""
        if self._tables is not None:
            return self._tables.vertices, self._tables.faces
        if self._mesh_tensors is None:
            import torch

            dev = self.torch_device
            self._mesh_tensors = (torch.as_tensor(self.V, dtype=torch.float64, device=dev),
                                  torch.as_tensor(self.F, dtype=torch.int64, device=dev))
        return self._mesh_tensors

    def closest_torch(self, points, upper_bound: float | None = None):
        """Device tensors: points float64 [N, 3] -> (distance float64 [N], inf at or beyond ``upper_bound``; closest
        face int64 [N], -1 there). The float32 BVH search runs with a slightly larger bound (relative 1e-5 + 1e-5) and
        the distance to the face it found is recomputed in float64."""
        import torch

        from d3s2.geometry.pseudo_normal import closest_point_on_triangles

        wp = self._wp
        dev = self.torch_device
        ub = 1.0e6 if upper_bound is None else float(upper_bound)
        n = len(points)
        d_out = torch.full((n,), float("inf"), dtype=torch.float64, device=dev)
        f_out = torch.full((n,), -1, dtype=torch.int64, device=dev)
        if n == 0:
            return d_out, f_out
        V, F = self.mesh_tensors()
        chunk = 1 << 24
        for s in range(0, n, chunk):
            p64 = points[s : s + chunk]
            p32 = p64.to(torch.float32).contiguous()
            d32 = torch.empty(len(p32), dtype=torch.float32, device=dev)
            f32 = torch.empty(len(p32), dtype=torch.int32, device=dev)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            wp.launch(
                self._kernels["closest"],
                dim=len(p32),
                inputs=[self.mesh.id, wp.from_torch(p32, dtype=wp.vec3), min(ub * (1 + 1e-5) + 1e-5, 1e6)],
                outputs=[wp.from_torch(d32), wp.from_torch(f32)],
                device=self.device,
            )
            wp.synchronize_device(self.device)
            hit = torch.nonzero(f32 >= 0).squeeze(1)
            face = f32[hit].long()
            tri = F[face]
            c, _ = closest_point_on_triangles(p64[hit], V[tri[:, 0]], V[tri[:, 1]], V[tri[:, 2]])
            d = torch.linalg.norm(p64[hit] - c, dim=1)
            d = torch.where(torch.isfinite(d), d, d32[hit].double())  # degenerate face: keep warp's distance
            inb = d < ub
            d_out[s + hit[inb]] = d[inb]
            f_out[s + hit[inb]] = face[inb]
        return d_out, f_out

    def closest(self, points: np.ndarray, upper_bound: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        import torch

        p = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float64).reshape(-1, 3)).to(self.torch_device)
        d, f = self.closest_torch(p, upper_bound)
        return d.cpu().numpy(), f.cpu().numpy()

    def unsigned_distance(self, points: np.ndarray, upper_bound: float | None = None) -> np.ndarray:
        return self.closest(points, upper_bound)[0]

    def inside(self, points: np.ndarray, max_dist: float | None = None) -> np.ndarray:
        """Winding number > 1/2. warp computes the sign inside a closest-point query: ``max_dist`` (a bound on the
        points' distances, known to the band code) prunes that search; points it misses are asked again unbounded."""
        mesh = self.winding_mesh()
        md = 1.0e6 if max_dist is None else float(max_dist)
        res = self._run(self._kernels["inside"], points, (md, self.accuracy), self._wp.int32, mesh)
        missed = res < 0
        if missed.any():
            res[missed] = self._run(
                self._kernels["inside"], np.asarray(points)[missed], (1.0e6, self.accuracy), self._wp.int32, mesh
            )
        return res > 0


def winding_fallback(queries):
    """``inside(points)`` for the points the pseudo-normal sign leaves ambiguous: libigl's fast winding number on the
    host for both back ends (so they agree exactly; these points are few), warp's when libigl is missing."""
    if isinstance(queries, CpuQueries):
        return queries.inside
    try:
        import igl  # noqa: F401
    except ImportError:
        return queries.inside
    cpu = getattr(queries, "_cpu_fallback", None)
    if cpu is None:
        cpu = queries._cpu_fallback = CpuQueries(queries.V, queries.F)
    return cpu.inside


def winding_factory(queries):
    """``(V, F) -> ((points, exact=False) -> float64 [N] winding numbers of the mesh (V, F))``, for the per-part
    buried-face test of ``d3s2.data.part_signs``: libigl's fast (``exact``: plain) winding number on the host for both
    back ends (as :func:`winding_fallback`); without libigl the back end's inside test of the whole mesh as 1.0 / 0.0 (flags more
    faces: more winding-number voxels, signs still right)."""
    try:
        import igl
    except ImportError:
        return lambda V, F: (lambda p, exact=False: queries.inside(p).astype(np.float64))

    def of(V, F):
        V = np.ascontiguousarray(V, dtype=np.float64)
        F = np.ascontiguousarray(F, dtype=np.int64)

        def winding(p, exact=False):
            p = np.ascontiguousarray(p, dtype=np.float64).reshape(-1, 3)
            if len(p) == 0:
                return np.zeros(0)
            return np.asarray((igl.winding_number if exact else igl.fast_winding_number)(V, F, p), dtype=np.float64)

        return winding

    return of


def make_queries(vertices, faces, backend: str = "auto", device: str | None = None):
    backend, device = resolve_backend(backend, device)
    if backend == "warp":
        return WarpQueries(vertices, faces, device=device)
    return CpuQueries(vertices, faces)
