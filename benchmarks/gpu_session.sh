#!/usr/bin/env bash
# The GPU measurements behind the README's Performance section, in one run (about 5 minutes on an
# H100/H200, plus the compilations of the torch.compile table): the CUDA equivalence tests of the
# fast paths, the model tables (channels-last, and the default layout for comparison), where a
# training step's time goes (benchmarks/step_profile.py), inference at other batch sizes, the
# models under torch.compile, and the AMP loss curves of the reference and the fast paths.
# Usage: OUT=results_dir bash benchmarks/gpu_session.sh   (writes its tables under $OUT)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_results}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi -L
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
$PY -m pytest tests/test_fast_paths.py -q -x -k cuda -p no:cacheprovider 2>&1 | tail -3 | tee "$OUT/cuda_tests.txt"
B="$PY benchmarks/benchmark.py --device cuda --warmup 2 --iters 3 --repeats 2"
R="--models resnet18,kw_resnet18,resnet50,kw_resnet50 --batch-sizes 128 --impls reference,auto"
$B $R --dtypes bf16,fp16,fp32 --channels-last 2>&1 | tee "$OUT/train_infer_b128_channels_last.md"
$B $R --dtypes bf16 2>&1 | tee "$OUT/train_infer_b128_default_layout.md"
$PY benchmarks/step_profile.py --models resnet18,kw_resnet18,resnet50,kw_resnet50 --dtype bf16 --batch-size 128 \
   --top 8 --channels-last 2>&1 | tee "$OUT/step_profile.md"
$B --models resnet50,kw_resnet50 --modes infer --batch-sizes 1,8,32,256 --dtypes bf16,fp32 --impls reference,auto \
   --channels-last 2>&1 | tee "$OUT/infer_batches.md"
$B --models mobilenetv2_100,kw_mobilenetv2_100,convnext_tiny,kw_convnext_tiny --batch-sizes 128 --dtypes bf16 \
   --impls reference,auto --channels-last 2>&1 | tee "$OUT/train_infer_b128_others.md"
# eager and compiled (inductor) side by side; compiling takes minutes, so only the headline model
$B --models resnet50,kw_resnet50 --batch-sizes 128 --dtypes bf16 --impls reference,auto --channels-last \
   --compile 2>&1 | tee "$OUT/train_infer_b128_compiled.md"
$PY benchmarks/loss_curve.py --device cuda --steps 300 --img-size 64 --batch-size 128 --dtype fp16 --channels-last \
   2>&1 | tee "$OUT/loss_curve_fp16.md"
