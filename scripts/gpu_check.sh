#!/usr/bin/env bash
# One accelerator check in ~9 minutes (README "Meshes, TPU pods and GPUs"): a test subset on the
# device, then a SmolLM2-135M-shaped GRPO run with random weights (fp32, bf16 rollout weights),
# its PEFT export loaded by peft, and a bf16 run. Needs jax with the device's plugin, the
# project's dependencies, torch and peft; the tokenizer/config of a converted SmolLM2 in $SRC.
#   SRC=~/.cache/lorarl_jax/hf/smollm2 OUT=/tmp/gpu bash scripts/gpu_check.sh
# Logs go to $OUT; each stage has its own time limit (T1, T2, T3 seconds) and runs regardless
# of the one before. P: the JAX platform (cuda, tpu, or cpu for a dry run); PREC: the default
# matmul precision; XLA_FLAGS as usual.
set -u
SRC=${SRC:-$HOME/.cache/lorarl_jax/hf/smollm2} OUT=${OUT:-/tmp/gpu_check} PY=${PY:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=${P:-cuda}
mkdir -p "$OUT"; L=$OUT/check.log
[ -n "${PREC:-}" ] && export JAX_DEFAULT_MATMUL_PRECISION=$PREC  # e.g. highest: no TF32
$PY -c "import jax, flax, optax, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'transformers', transformers.__version__, jax.devices())" 2>&1 | tee "$L"
$PY scripts/gpu_check.py random-model "$SRC" /tmp/gpu_check_model 2>&1 | tail -1 | tee -a "$L"
echo "== tests on the device (-v: each result as it comes)" | tee -a "$L"
timeout -s INT "${T1:-150}" $PY -m pytest -m "not slow" -n "${WORKERS:-8}" --dist loadfile -p no:cacheprovider \
  -p no:benchmark -v --tb=line -rfE tests/test_losses.py tests/test_model_parity.py tests/test_lora.py \
  tests/test_peft.py tests/test_sampler.py tests/test_step.py tests/test_rollout_dtype.py > "$OUT/pytest.log" 2>&1
echo "pytest rc $?" | tee -a "$L"; grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest.log" | head -60 >> "$L"
RUN="-m lorarl_jax.main --config configs/demo.py --config.model.path=/tmp/gpu_check_model
  --config.data.reward_fns=('scripts/gpu_check.py:vowels',) --config.data.reward_weights=(1.0,)
  --config.data.max_val_samples=0 --config.trainer.eval_before=False --config.trainer.ckpt_interval=0"
echo "== GRPO run, fp32 (bf16 rollout weights)" | tee -a "$L"
JAX_LOG_COMPILES=1 timeout -s INT "${T2:-240}" $PY $RUN --config.trainer.steps="${S2:-20}" \
  --config.trainer.output_dir=/tmp/gpu_check_fp32 > "$OUT/fp32.log" 2>&1
echo "fp32 run rc $?" | tee -a "$L"
grep -o "Finished XLA compilation of [^ ]* in [0-9.]* sec" "$OUT/fp32.log" | awk '$(NF-1) > 1' >> "$L"
$PY scripts/gpu_check.py summary /tmp/gpu_check_fp32/metrics.jsonl 2>&1 | tee -a "$L"
timeout 90 $PY scripts/gpu_check.py peft-load /tmp/gpu_check_model /tmp/gpu_check_fp32/adapter 2>&1 | tail -1 | tee -a "$L"
echo "== GRPO run, bf16 model" | tee -a "$L"
timeout -s INT "${T3:-120}" $PY $RUN --config.model.dtype=bfloat16 --config.model.param_dtype=bfloat16 \
  --config.rollout.weight_dtype= --config.trainer.steps="${S3:-8}" \
  --config.trainer.output_dir=/tmp/gpu_check_bf16 > "$OUT/bf16.log" 2>&1
echo "bf16 run rc $?" | tee -a "$L"
$PY scripts/gpu_check.py summary /tmp/gpu_check_bf16/metrics.jsonl 2>&1 | tee -a "$L"
