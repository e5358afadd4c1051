"""warp kernels of ``d3s2.geometry.queries.WarpQueries`` (closest point / face, winding-number sign).

Kept in a module without ``from __future__ import annotations``: warp reads the kernel annotations as types, and
older warp releases cannot resolve them from strings.
"""

import functools


@functools.lru_cache(maxsize=None)
def kernels():
    """Compile-on-first-use kernels (cached per process)."""
    import warp as wp

    @wp.kernel
    def inside_kernel(
        mesh: wp.uint64, pts: wp.array(dtype=wp.vec3), max_dist: float, accuracy: float, out: wp.array(dtype=wp.int32)
    ):
        # 1 inside (winding number > 1/2), 0 outside, -1 no face within max_dist (the caller asks again unbounded)
        i = wp.tid()
        q = wp.mesh_query_point_sign_winding_number(mesh, pts[i], max_dist, accuracy, 0.5)
        out[i] = -1
        if q.result:
            out[i] = 0
            if q.sign < 0.0:
                out[i] = 1

    @wp.kernel
    def closest_kernel(
        mesh: wp.uint64,
        pts: wp.array(dtype=wp.vec3),
        max_dist: float,
        out_d: wp.array(dtype=float),
        out_f: wp.array(dtype=wp.int32),
    ):
        # float32 distance and closest face (-1 / 1e30: none within max_dist); the caller refines in float64
        i = wp.tid()
        p = pts[i]
        q = wp.mesh_query_point_no_sign(mesh, p, max_dist)
        if q.result:
            out_d[i] = wp.length(wp.mesh_eval_position(mesh, q.face, q.u, q.v) - p)
            out_f[i] = q.face
        else:
            out_d[i] = 1.0e30
            out_f[i] = -1

    return {"inside": inside_kernel, "closest": closest_kernel}
