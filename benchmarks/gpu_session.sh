#!/usr/bin/env bash
# The GPU measurements behind docs/performance.md, in stages, the most wanted first, so
# that a session cut short (a lent GPU may have 10 minutes for one command) still returns them:
#   tests     the CUDA equivalence tests of the fast paths                               (under a minute)
#   tables    the KW and plain ResNets at batch 128, channels-last, bf16 and fp16         (about 2 minutes)
#   compiled  ResNet50 and KW ResNet50 training, eager and compiled (inductor), then KW ResNet50 in
#             mode reduce-overhead, then main.py compiled under torchrun (DDP)             (minutes: compiling)
#   curve     the AMP (fp16) loss curves of the reference and the fast paths               (under a minute)
#   profile   where a training step's time goes (bf16; fp16 too), and with CUDA graphs    (about 2 minutes)
#   more      the default layout, fp32, inference at other batch sizes, other models       (about 3 minutes)
# Usage: OUT=results_dir bash benchmarks/gpu_session.sh [STAGE ...]   (default: every stage, in this order)
# Each stage writes one file under $OUT as it goes (8 files in all).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_results}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGES=${*:-tests tables compiled curve profile more}
B="$PY benchmarks/benchmark.py --device cuda --warmup 2 --iters 3 --repeats 2"
RESNETS="--models resnet18,kw_resnet18,resnet50,kw_resnet50 --batch-sizes 128 --impls reference,auto"

tests() {
  $PY -m pytest tests/test_fast_paths.py -q -x -k cuda -p no:cacheprovider 2>&1 | tail -3 | tee "$OUT/cuda_tests.txt"
}

tables() {
  $B $RESNETS --dtypes bf16,fp16 --channels-last 2>&1 | tee "$OUT/train_infer_b128_channels_last.md"
}

compiled() {
  # the eager reference row is in the tables stage; compiling it would only cost time
  $B --models resnet50,kw_resnet50 --batch-sizes 128 --dtypes bf16 --impls auto --channels-last --modes train \
     --compile 2>&1 | tee "$OUT/train_b128_compiled.md"
  $B --models kw_resnet50 --batch-sizes 128 --dtypes bf16 --impls auto --channels-last --modes train \
     --compile --compile-mode reduce-overhead 2>&1 | tee -a "$OUT/train_b128_compiled.md"
  # the route for several processes: does the DDP-wrapped model compile, graphs included, and train?
  $PY -m torch.distributed.run --nproc_per_node 1 main.py --model kw_resnet18 --data_set DIGITS --input_size 64 \
     --batch_size 128 --epochs 2 --warmup_epochs 0 --opt sgd --lr 0.01 --use_amp true --amp_dtype bfloat16 \
     --channels_last true --num_workers 4 --aa none --reprob 0 --mixup 0 --cutmix 0 --smoothing 0 \
     --color_jitter 0 --print_freq 10 --save_ckpt false --auto_resume false --output_dir "$(mktemp -d)" \
     --compile true --compile_mode reduce-overhead 2>&1 | grep -E "Epoch: \[1\]|Total time|Acc@1|Error|error" \
     | tee -a "$OUT/train_b128_compiled.md"
}

curve() {
  $PY benchmarks/loss_curve.py --device cuda --steps 300 --img-size 64 --batch-size 128 --dtype fp16 \
     --channels-last 2>&1 | tee "$OUT/loss_curve_fp16.md"
}

profile() {
  $PY benchmarks/step_profile.py --models resnet18,kw_resnet18,resnet50,kw_resnet50 --dtype bf16 \
     --batch-size 128 --top 8 --channels-last 2>&1 | tee "$OUT/step_profile.md"
  # why eager fp16 ran slower than bf16 for the KW models only: host time, or the GPU's kernels?
  $PY benchmarks/step_profile.py --models resnet50,kw_resnet50 --dtype fp16 \
     --batch-size 128 --top 8 --channels-last 2>&1 | tee -a "$OUT/step_profile.md"
}

more() {
  $B $RESNETS --dtypes bf16 2>&1 | tee "$OUT/train_infer_b128_more.md"
  $B $RESNETS --dtypes fp32 --channels-last 2>&1 | tee -a "$OUT/train_infer_b128_more.md"
  $B --models resnet50,kw_resnet50 --modes infer --batch-sizes 1,8,32,256 --dtypes bf16,fp32 \
     --impls reference,auto --channels-last 2>&1 | tee "$OUT/infer_batches.md"
  $B --models mobilenetv2_100,kw_mobilenetv2_100,convnext_tiny,kw_convnext_tiny --batch-sizes 128 \
     --dtypes bf16 --impls reference,auto --channels-last 2>&1 | tee "$OUT/train_infer_b128_others.md"
}

nvidia-smi -L
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
for stage in $STAGES; do
  case $stage in
    tests|tables|compiled|curve|profile|more) echo "== $stage ($(date +%T))"; $stage ;;
    *) echo "unknown stage '$stage': use tests, tables, compiled, curve, profile or more" >&2; exit 2 ;;
  esac
done
echo "== done ($(date +%T))"
