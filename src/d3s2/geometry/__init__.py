"""Geometry for inference (issue 6): sparse marching cubes on sparse SDF voxels, mesh clean-up (floaters, interior
shells, decimation, normals), metrics (Chamfer, F-score, volume IoU) and export (GLB / OBJ / PLY / STL); and the mesh
primitives under both inference and dataset preparation (issue 23): closest-point / winding-number queries
(``queries``: libigl or warp; ``warp_kernels``), angle-weighted pseudo-normals (``pseudo_normal``), the z-buffer
rasteriser (``raster``), pinhole cameras (``cameras``) and the octree band (``band``). Nothing here imports
``d3s2.data``.

Modules: ``marching_cubes`` (torch, CPU/CUDA), ``cleanup`` and ``export`` (trimesh, scipy, fast-simplification: the
``d3s2[mesh]`` extra), ``metrics``. Import what you need from the submodules; nothing heavy is imported here.
"""
