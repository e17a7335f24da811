#!/usr/bin/env bash
# What a GPU machine checks, in stages that each fit in a few minutes. Run from the repository root
# (the package from the working tree); results go to ${OUT:-gpu-results}/.
#
#   bash benchmarks/gpu_check.sh tests   # versions, compile check for this GPU, CUDA kernel tests
#   bash benchmarks/gpu_check.sh bench   # auto's cost model for the GPU; the table at 4k and 16k (bf16)
#   bash benchmarks/gpu_check.sh large   # 64k for every topology, 256k for the linear ones, 1M window/random
#   bash benchmarks/gpu_check.sh gqa     # grouped-query attention (12 on 4 heads) at 16k: the grouped kernels
set -uo pipefail
stage=${1:?usage: gpu_check.sh tests|bench|large|gqa}
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
export TRITON_INTERPRET=0
case "$stage" in
  tests)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
    python -c "import sys, torch, triton, torch_geometric as g; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'pyg', g.__version__)" | tee -a "$out/gpu.txt"
    arch=$(python -c "import torch; a, b = torch.cuda.get_device_capability(); print(10 * a + b)")
    python -m gnn_transformer.kernels.compile_check --arch "$arch" 2>&1 | tee "$out/compile_check.md"
    python -m pytest -q -x -p no:cacheprovider tests/test_kernels_cuda.py 2>&1 | tee "$out/cuda_tests.txt"
    ;;
  bench)
    python -m gnn_transformer.cli bench --device cuda --calibrate --sizes 16384 --markdown "$out/calibrate.md" \
      2>&1 | tee "$out/calibrate.txt"
    python -m gnn_transformer.cli bench --device cuda --sizes 4096 16384 --markdown "$out/bench_16k.md" \
      2>&1 | tee "$out/bench_16k.txt"
    ;;
  gqa)
    # grouped-query attention (12 query heads on 4 key/value heads): the grouped CSR kernels
    python -m gnn_transformer.cli bench --device cuda --sizes 16384 --kv-heads 4 --topologies random bigbird \
      --backends fused auto flex --markdown "$out/bench_16k_gqa.md" 2>&1 | tee "$out/bench_16k_gqa.txt"
    ;;
  large)
    python -m gnn_transformer.cli bench --device cuda --sizes 65536 --repeats 3 \
      --markdown "$out/bench_64k.md" 2>&1 | tee "$out/bench_64k.txt"
    python -m gnn_transformer.cli bench --device cuda --sizes 262144 --repeats 3 \
      --topologies window bigbird random --backends fused tiled auto flex \
      --markdown "$out/bench_256k.md" 2>&1 | tee "$out/bench_256k.txt"
    # the 1M-token target: window and random (BigBird at 1M has ~640M edges)
    python -m gnn_transformer.cli bench --device cuda --sizes 1048576 --repeats 3 \
      --topologies window random --backends fused tiled auto flex \
      --markdown "$out/bench_1m.md" 2>&1 | tee "$out/bench_1m.txt"
    ;;
  *)
    echo "unknown stage '$stage' (expected tests, bench, large or gqa)" >&2
    exit 2
    ;;
esac
