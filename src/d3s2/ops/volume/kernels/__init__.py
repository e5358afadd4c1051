"""Triton kernels of the refiners' dense-volume ops, one file per kernel (references in ``../reference.py``)."""
