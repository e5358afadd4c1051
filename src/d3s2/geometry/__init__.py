"""Geometry for inference (issue 6): sparse marching cubes on sparse SDF voxels, mesh clean-up (floaters, interior
shells, decimation, normals), metrics (Chamfer, F-score, volume IoU) and export (GLB / OBJ / PLY / STL).

Modules: ``marching_cubes`` (torch, CPU/CUDA), ``cleanup`` and ``export`` (trimesh, scipy, fast-simplification: the
``d3s2[mesh]`` extra), ``metrics``. Import what you need from the submodules; nothing heavy is imported here.
"""
