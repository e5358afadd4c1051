#!/usr/bin/env bash
# Issue 10: multi-GPU training benchmark (bench/multi_gpu.py) on the device machine, in one call of <= 10 minutes:
#   run(kind="nvidia-h100-x2", carry=[".whl"], timeout_s=600, command="bash bench/multi_gpu.sh")
# .whl/ (git-ignored) is what `demo/pack_meshes.sh /work/main/.sdf_carry` writes: demo_meshes.tgz (pybullet meshes)
# + trimesh + libigl cp312 wheels (the device machine has neither, nor pybullet). Results: $OUT/multi_gpu-<card>x<N>
# .json and .md, per-rank trainer logs under $OUT/multi_gpu_logs/. Extra arguments go to bench/multi_gpu.py (e.g.
# --cpu, --budget-s 500, --runs dit_1gpu,dit_ddp, --fsdp-resume, --set-dit data.workers=8).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# NVLink multicast off in NCCL, PyTorch and NVSHMEM (KINDS.md: it can take the host's shared GPUs out of service)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PYTHON:-python3}
nvidia-smi -L 2>/dev/null || true
exec "$PY" bench/multi_gpu.py --out "${OUT:-bench/results}" --wheels .whl --meshes-tgz .whl/demo_meshes.tgz "$@"
