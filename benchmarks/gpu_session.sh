#!/usr/bin/env bash
# The GPU measurements behind the README's Performance section, in one run (about 3 minutes on an
# H100/H200): the CUDA equivalence tests of the fast paths, the model tables, where a training step's
# time goes (benchmarks/step_profile.py), the AMP loss curves of the reference and the fast paths, and
# per-layer timings (benchmarks/layers.py).
# Usage: OUT=results_dir bash benchmarks/gpu_session.sh   (writes its tables under $OUT)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_results}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi -L
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
$PY -m pytest tests/test_fast_paths.py -q -x -k "matches_reference and cuda" 2>&1 | tail -3 | tee "$OUT/cuda_tests.txt"
B="$PY benchmarks/benchmark.py --device cuda --warmup 2 --iters 3 --repeats 2"
$B --models resnet18,kw_resnet18,resnet50,kw_resnet50 --batch-sizes 128 --dtypes bf16,fp16,fp32 \
   --impls reference,auto 2>&1 | tee "$OUT/train_infer_b128.md"
$PY benchmarks/step_profile.py --models resnet18,kw_resnet18,resnet50,kw_resnet50 --dtype bf16 --batch-size 128 --top 8 \
   2>&1 | tee "$OUT/step_profile.md"
$B --models resnet50,kw_resnet50 --modes infer --batch-sizes 1,8,32,256 --dtypes bf16,fp32 --impls reference,auto \
   2>&1 | tee "$OUT/infer_batches.md"
$B --models mobilenetv2_100,kw_mobilenetv2_100,convnext_tiny,kw_convnext_tiny --batch-sizes 128 --dtypes bf16 \
   --impls reference,auto 2>&1 | tee "$OUT/train_infer_b128_others.md"
$B --models resnet18,kw_resnet18 --batch-sizes 16 --dtypes bf16 --impls reference,auto 2>&1 | tee "$OUT/train_infer_b16.md"
$PY benchmarks/loss_curve.py --device cuda --steps 300 --img-size 64 --batch-size 128 --dtype fp16 2>&1 | tee "$OUT/loss_curve_fp16.md"
$PY benchmarks/layers.py --device cuda --model kw_resnet50 --batch-size 128 --dtype bf16 2>&1 | tee "$OUT/layers_kw_resnet50_bf16.md"
