#!/usr/bin/env bash
# What a GPU machine checks, in stages that each fit in a few minutes. Run from the repository root
# (the package from the working tree); results go to ${OUT:-gpu-results}/.
#
#   bash benchmarks/gpu_check.sh table   # the whole GPU table in at most 8 minutes (the steps' limits add
#                                        # up to 480 s): versions, CUDA kernel tests, 16k bf16 (fwd,
#                                        # fwd+bwd) of every topology against SDPA and every FlexAttention
#                                        # mask_mod that can run on it, the GraphLM training step against a
#                                        # plain GPT (bf16 autocast), causal at 64k and 128k (implicit
#                                        # graphs), window/random at 1M; markdown in $OUT/table.md
#   bash benchmarks/gpu_check.sh tests   # versions, compile check for this GPU, CUDA kernel tests
#   bash benchmarks/gpu_check.sh bench   # auto's cost model for the GPU; the table at 4k and 16k (bf16)
#   bash benchmarks/gpu_check.sh large   # 64k for every topology, 256k for the linear ones, 1M window/random
#   bash benchmarks/gpu_check.sh gqa     # grouped-query attention (12 on 4 heads) at 16k: the grouped kernels
#   bash benchmarks/gpu_check.sh pieces  # BigBird with its global blocks' rows in pieces, and without
#   bash benchmarks/gpu_check.sh float32 # float32 tiles (CUDA cores) of 32, the default, against 64
#   bash benchmarks/gpu_check.sh select  # graphs chosen from the data at 16k (bf16): per-head tests, then
#                                        # selection (block_topk: an implicit BlockGraph) + attention against
#                                        # Flex with a per-call BlockMask and SDPA
#   bash benchmarks/gpu_check.sh implicit # causal at 64k and 128k (bf16, 12 x 64) through the implicit graph
#                                        # (topology.causal(n, implicit=True): tiles, no edge list), tiled and
#                                        # auto (SDPA), fwd and fwd+bwd, with the peak memory
set -uo pipefail
stage=${1:?usage: gpu_check.sh table|tests|bench|large|gqa|pieces|float32|select|implicit}
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
export TRITON_INTERPRET=0
# one command of the table, stopped at its time limit (seconds; killed 5 s later if it ignores the
# interrupt) so the whole table stays within 8 minutes; a stopped command's table is not written:
# table.md then holds the last 40 lines of its log (the rows it printed so far) and a line saying so
step() {
  local limit=$1 name=$2
  shift 2
  # through bash: the commands include this script's functions (exported below), which timeout cannot run
  timeout --signal=INT --kill-after=5 "$limit" bash -c '"$@"' _ "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo "stopped after ${limit}s" >> "$out/$name.txt"
  if [ -f "$out/$name.md" ]; then
    { echo; echo "### $name"; echo; cat "$out/$name.md"; } >> "$out/table.md"
  else
    { echo; echo "### $name (rc $rc, no table; last lines of its log)"; echo; echo '```'; tail -n 40 "$out/$name.txt"; echo '```'; } \
      >> "$out/table.md"
  fi
}
bench() { python -m gnn_transformer.cli bench --device cuda "$@"; }
export -f bench
xdist=$(python -c "import xdist" 2>/dev/null && echo "-n 4 --dist loadgroup")
case "$stage" in
  table)
    start=$(date +%s)
    {
      echo "# GPU table"
      echo
      echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
      echo "- gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
      echo "- versions: $(python -c "import sys, torch, triton, torch_geometric as g; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'pyg', g.__version__)")"
      echo "- command: bash benchmarks/gpu_check.sh table"
    } > "$out/table.md"
    # every failure listed (no -x: the script runs once); 4 workers where pytest-xdist is installed,
    # since compiling the kernels (CPU) takes most of this step (tests marked xdist_group share one)
    step 110 cuda_tests python -m pytest -q -p no:cacheprovider $xdist tests/test_kernels_cuda.py tests/test_kernels_sdpa.py
    # 16k, bfloat16, 12 heads x 64: each topology against SDPA and every Flex mask_mod variant (those
    # that cannot run on a graph say why in the flex row)
    step 55 bench_16k_causal bench --sizes 16384 --topologies causal --backends fused tiled auto sdpa flex \
      --repeats 3 --markdown "$out/bench_16k_causal.md"
    step 50 bench_16k_document bench --sizes 16384 --topologies document --backends tiled auto sdpa flex \
      --repeats 3 --markdown "$out/bench_16k_document.md"
    step 70 bench_16k_window bench --sizes 16384 --topologies window --backends fused tiled auto sdpa flex \
      --repeats 3 --markdown "$out/bench_16k_window.md"
    step 50 bench_16k_bigbird bench --sizes 16384 --topologies bigbird --backends fused tiled auto sdpa flex \
      --repeats 3 --markdown "$out/bench_16k_bigbird.md"
    step 40 bench_16k_random bench --sizes 16384 --topologies random --backends fused tiled auto sdpa flex \
      --repeats 3 --markdown "$out/bench_16k_random.md"
    step 30 train_step bench --train-step 64 256 --repeats 5 --markdown "$out/train_step.md"
    # causal at 64k and 128k as implicit graphs (an edge list of 2.1e9 / 8.6e9 edges is past the
    # edge budget or too slow to build), window and random at 1M (auto only)
    step 40 implicit_causal python benchmarks/implicit_causal.py --markdown "$out/implicit_causal.md"
    step 35 linear_1m bench --sizes 1048576 --topologies window random --backends auto --repeats 3 --no-backward \
      --markdown "$out/linear_1m.md"
    echo "- took $(( $(date +%s) - start )) s" >> "$out/table.md"
    cat "$out/table.md"
    ;;
  tests)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
    python -c "import sys, torch, triton, torch_geometric as g; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'pyg', g.__version__)" | tee -a "$out/gpu.txt"
    arch=$(python -c "import torch; a, b = torch.cuda.get_device_capability(); print(10 * a + b)")
    python -m gnn_transformer.bench.compile_check --arch "$arch" 2>&1 | tee "$out/compile_check.md"
    python -m pytest -q -p no:cacheprovider $xdist tests/test_kernels_cuda.py 2>&1 | tee "$out/cuda_tests.txt"
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
  pieces)
    # long rows in pieces (kernels._pieces: auto, the default) against none (0), side by side
    for length in auto 0; do
      python - "$length" bench --device cuda --sizes 16384 65536 --topologies bigbird --backends fused tiled auto \
        --markdown "$out/bench_pieces_$length.md" <<'PY' 2>&1 | tee "$out/bench_pieces_$length.txt"
import sys
from gnn_transformer.kernels import _pieces
from gnn_transformer.cli import main
_pieces.LENGTH = None if sys.argv[1] == "auto" else int(sys.argv[1])
sys.exit(main(sys.argv[2:]))
PY
    done
    ;;
  float32)
    # float32 runs the tiles on CUDA cores; tiles of 32 (CUDA_CORE_BLOCK_SIZE) do not spill, 64 do
    for block in 32 64; do
      python -m gnn_transformer.cli bench --device cuda --dtype float32 --sizes 16384 --block-size "$block" \
        --topologies causal window bigbird --backends fused tiled auto flex \
        --markdown "$out/bench_float32_block$block.md" 2>&1 | tee "$out/bench_float32_block$block.txt"
    done
    ;;
  select)
    python -m pytest -q -x -p no:cacheprovider tests/test_kernels_per_head.py -k "not triton" 2>&1 \
      | tee "$out/per_head_tests.txt"
    python -m gnn_transformer.cli bench --device cuda --selectors topk block_topk --sizes 16384 \
      --markdown "$out/bench_select_16k.md" 2>&1 | tee "$out/bench_select_16k.txt"
    ;;
  implicit)
    python benchmarks/implicit_causal.py --markdown "$out/implicit_causal.md" 2>&1 | tee "$out/implicit_causal.txt"
    ;;
  large)
    python -m gnn_transformer.cli bench --device cuda --sizes 65536 --repeats 3 \
      --markdown "$out/bench_64k.md" 2>&1 | tee "$out/bench_64k.txt"
    # Flex on random 64 takes its whole BlockMask (1.1 s a call at 64k on an H100): window and BigBird only
    python -m gnn_transformer.cli bench --device cuda --sizes 262144 --repeats 3 \
      --topologies window bigbird --backends fused tiled auto flex \
      --markdown "$out/bench_256k.md" 2>&1 | tee "$out/bench_256k.txt"
    python -m gnn_transformer.cli bench --device cuda --sizes 262144 --repeats 3 \
      --topologies random --backends fused tiled auto \
      --markdown "$out/bench_256k_random.md" 2>&1 | tee "$out/bench_256k_random.txt"
    # the issue's 1M-token target: window and random (BigBird at 1M has ~640M edges; tiles of the
    # random graph would need 227 GiB)
    python -m gnn_transformer.cli bench --device cuda --sizes 1048576 --repeats 3 \
      --topologies window random --backends fused auto \
      --markdown "$out/bench_1m.md" 2>&1 | tee "$out/bench_1m.txt"
    ;;
  *)
    echo "unknown stage '$stage' (expected table, tests, bench, large, gqa, pieces, float32, select or implicit)" >&2
    exit 2
    ;;
esac
