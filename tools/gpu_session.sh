#!/usr/bin/env bash
# One prepared GPU session (a lent H100/H200 machine, about 10 minutes): everything in this
# project that needs a GPU, run once, each phase bounded so the whole script ends in time.
#
#   1. the shapes training recipe on CUDA: a sweep of recipe variants run side by side
#      (SWEEP below), each stopped by --max-minutes, then the model card's evaluation
#      (200 prompts, seed 2026, 30 DDIM steps) of each on CUDA through Sampler.from_diffusers;
#   2. the C++/CUDA build (tools/dev_install.py --cuda) and tests/test_kernels_cuda.py;
#   3. python -m cfgswitch.benchmarks.kernels_bench --device cuda;
#   4. benchmarks/gpu_suite.py on SD 1.5 (eager, CUDA graphs, diffusers), then torch.compile;
#   5. the torch runner modes test on CUDA, and TensorRT for RTX plans run on this GPU when installed;
#   6. the step engine's GPU cell (python -m cfgswitch.benchmarks.engine_gpu).
#
# Usage, from the repository root, with diffusers' wheel (and importlib_metadata's) in .whl/:
#   OUT=/some/folder bash tools/gpu_session.sh
# Results: $OUT/sweep.tar.gz (logs, evaluations), $OUT/models_<name>.tar.gz (weights without the
# tokenizer), $OUT/gpu.tar.gz (kernel tests, kernel bench, GPU suite), $OUT/session.log.
# Environment: TRAIN_MINUTES (default 4.2), STEPS (the schedule's UNet steps, default 12000),
#   DEVICE (default cuda), TRAIN_EXTRA (more train-shapes arguments), SWEEP_ONLY=1 (stop after 1).
set -u
OUT="${OUT:-out/gpu-session}"
mkdir -p "$OUT"
W=/tmp/gpu-session
rm -rf "$W" && mkdir -p "$W/sweep" "$W/gpu"
exec > >(tee -a "$OUT/session.log") 2>&1
START=$SECONDS
say() { echo "[gpu_session +$((SECONDS - START))s] $*"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$W/gpu/nvidia_smi.txt"
python3 tools/dev_install.py --no-build >/dev/null || exit 1
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee "$W/gpu/versions.txt"

# ---------------------------------------------------------------- 1. recipe sweep
STEPS="${STEPS:-12000}"
DEVICE="${DEVICE:-cuda}"
TRAIN_MINUTES="${TRAIN_MINUTES:-4.2}"
declare -A SWEEP=(
  [eps]=""
  [x0cap5]="--set x0_weight_cap=5"
  [x0cap25]="--set x0_weight_cap=25"
  [tpow06]="--set t_power=0.6"
)
PIDS=()
for name in "${!SWEEP[@]}"; do
  # shellcheck disable=SC2086
  python3 -m cfgswitch train-shapes --out "$W/sweep/$name" --device "$DEVICE" --no-progress --unet-steps "$STEPS" \
    --max-minutes "$TRAIN_MINUTES" --set eval_every=1000 --set save_every=0 ${SWEEP[$name]} ${TRAIN_EXTRA:-} \
    >"$W/sweep/$name.log" 2>&1 &
  PIDS+=($!)
done
say "sweep started: ${!SWEEP[*]}"

# ---------------------------------------------------------------- 2. build and CUDA tests (beside the sweep)
if [[ "${SWEEP_ONLY:-0}" != 1 ]]; then
  sleep 10  # the sweep imports cfgswitch before the build replaces its extension
  python3 tools/dev_install.py --cuda >"$W/gpu/build.log" 2>&1 && say "build ok" || say "build FAILED (see build.log)"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py -rs >"$W/gpu/test_kernels_cuda.txt" 2>&1
  say "test_kernels_cuda: $(tail -n 1 "$W/gpu/test_kernels_cuda.txt")"
  tar -czf "$OUT/gpu.tar.gz" -C "$W" gpu
fi

wait "${PIDS[@]}"  # a bare wait would also wait for the tee above
say "sweep trained"
PIDS=()
for name in "${!SWEEP[@]}"; do
  if [[ -d "$W/sweep/$name/model" ]]; then
    timeout 120 python3 -m cfgswitch.shapes.evaluate "$W/sweep/$name/model" --count "${EVAL_COUNT:-200}" --seed 2026 --device "$DEVICE" \
      --out "$W/sweep/$name/card_eval.json" >"$W/sweep/$name.eval.log" 2>&1 &
    PIDS+=($!)
  fi
done
wait "${PIDS[@]}"
for name in "${!SWEEP[@]}"; do
  say "$name: $(grep '"phase": "eval"' "$W/sweep/$name/train_log.jsonl" | tail -n 1)"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({p: {k: round(v, 3) for k, v in f.items()} for p, f in d.items()})" \
    "$W/sweep/$name/card_eval.json" 2>/dev/null || say "$name: no card evaluation (see $name.eval.log)"
done
for name in "${!SWEEP[@]}"; do
  tar -czf "$OUT/models_$name.tar.gz" -C "$W/sweep/$name" --exclude tokenizer model 2>/dev/null
  rm -rf "$W/sweep/$name/model"
done
tar -czf "$OUT/sweep.tar.gz" -C "$W" sweep
if [[ "${SWEEP_ONLY:-0}" == 1 ]]; then say "done (sweep only)"; exit 0; fi

# ---------------------------------------------------------------- 3. kernel bench (GPU to itself now)
timeout 90 python3 -m cfgswitch.benchmarks.kernels_bench --device cuda --steps 30 --repeats 5 \
  --json "$W/gpu/kernels_cuda.json" >"$W/gpu/kernels_bench.txt" 2>&1
say "kernels_bench rc=$?"
tar -czf "$OUT/gpu.tar.gz" -C "$W" gpu

# ---------------------------------------------------------------- 4. GPU suite, SD 1.5 (eager, graphs, diffusers; then compile)
left=$((560 - (SECONDS - START)))
if (( left > 60 )); then
  timeout $((left > 150 ? 150 : left)) python3 benchmarks/gpu_suite.py --out "$W/gpu/suite" --models sd15 \
    --variants diffusers,eager,graphs --budget-s 90 --no-progress >"$W/gpu/suite.log" 2>&1
  say "gpu_suite rc=$?"
  tar -czf "$OUT/gpu.tar.gz" -C "$W" gpu
fi
left=$((575 - (SECONDS - START)))
if (( left > 100 )); then
  timeout "$left" python3 benchmarks/gpu_suite.py --out "$W/gpu/suite-compile" --models sd15 \
    --variants eager,compile --budget-s $((left - 80)) --no-progress >"$W/gpu/suite_compile.log" 2>&1
  say "gpu_suite compile rc=$?"
  tar -czf "$OUT/gpu.tar.gz" -C "$W" gpu
fi
# ---------------------------------------------------------------- 5. torch runner modes, TensorRT for RTX (issue 13)
# The runtime's own torch runners: mode="graphs" against eager on CUDA (tests/test_torch_modes.py). TensorRT for RTX
# plans built on this GPU and run against ONNX Runtime when its wheel came along (.whl/; about 230 MB installed, so it
# does not fit the 64 MiB a session carries: this step says so and skips).
left=$((590 - (SECONDS - START)))
if (( left > 40 )); then
  timeout $((left > 120 ? 120 : left)) python3 -m pytest -q -p no:cacheprovider tests/test_torch_modes.py -rs \
    >"$W/gpu/test_torch_modes.txt" 2>&1
  say "test_torch_modes: $(tail -n 1 "$W/gpu/test_torch_modes.txt")"
fi
if python3 -c "import tensorrt_rtx" 2>/dev/null; then
  left=$((595 - (SECONDS - START)))
  (( left > 60 )) && timeout "$left" python3 -m pytest -q -p no:cacheprovider tests/test_tensorrt_rtx_build.py \
    -k "run_and_match" -rs >"$W/gpu/test_rtx_runtime.txt" 2>&1
  say "TensorRT for RTX on this GPU: $(tail -n 1 "$W/gpu/test_rtx_runtime.txt" 2>/dev/null)"
else
  say "TensorRT for RTX: not installed here (its wheel does not fit the carried tree): not run"
fi
# ---------------------------------------------------------------- 6. the step engine's GPU cell (issue 12)
# The serving suite on an SD 1.5-size random UNet, fp16, one CUDA graph per row bucket: request-level batching,
# the step engine on always and on switch:0.5, one request at a time, interleaved per offered rate.
left=$((595 - (SECONDS - START)))
if (( left > 90 )); then
  timeout "$left" python3 -m cfgswitch.benchmarks.engine_gpu --out "$W/gpu/serving" --requests 32 \
    --max-minutes $(( (left - 60) / 60 > 1 ? (left - 60) / 60 : 1 )) >"$W/gpu/serving.log" 2>&1
  say "step engine GPU cell: $(grep -E 'engine_switch_over_request_batching|realized_over_ideal' "$W/gpu/serving.log" | tr '\n' ' ')"
else
  say "step engine GPU cell: no time left"
fi
tar -czf "$OUT/gpu.tar.gz" -C "$W" gpu
say "done"
