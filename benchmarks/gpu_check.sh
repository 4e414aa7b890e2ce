#!/usr/bin/env bash
# GPU check of issue 13 (CUDA tests + train-step benchmarks), one prepared run on a CUDA machine.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results in $OUT (default benchmarks/results/gpu)
#
# Needs only what the machine has (torch, timm, peft, transformers) plus diffusers, installed from
# the carried wheel folder .whl/ if present (no network). Every phase has its own time cap, so the
# whole script ends in about 6.5 minutes on an H200 (run it with a 500 s limit); a phase that runs
# out keeps what it measured (JSON/markdown are written after each run). Writes at most 8 files:
#   gpu_check.log  pytest_cuda.log  vit_b16.log  sd15_unet.log
#   train_step_vit_b16_cuda_bf16.{json,md}  train_step_sd15_unet_cuda_bf16.{json,md}
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SPECTRAL_VISION_CACHE=/tmp/sv-cache TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY=${PY:-python3}
T0=$SECONDS
log() { echo "[gpu_check +$((SECONDS - T0))s] $*" | tee -a "$OUT/gpu_check.log"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  log "installing carried wheels: $(ls .whl)"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$OUT/gpu_check.log" 2>&1 || log "wheel install FAILED"
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1
  $PY -c "import sys, torch, timm, peft, transformers; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'timm', timm.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)"
  $PY -c "import diffusers; print('diffusers', diffusers.__version__)" || echo "diffusers MISSING: sd15_unet will fail"
} >>"$OUT/gpu_check.log" 2>&1

log "pytest -m cuda (cap 75 s)"
timeout 75 $PY -m pytest -q -m cuda tests/ -p no:cacheprovider --continue-on-collection-errors -rfEs \
  >"$OUT/pytest_cuda.log" 2>&1
log "pytest exit $? ($(tail -n 1 "$OUT/pytest_cuda.log"))"

# ViT-B/16, batch 64, 224 px, r=8: every method, auto form + forced delta form, eager then torch.compile
log "vit_b16 (cap 130 s)"
timeout 130 $PY benchmarks/train_step.py --device cuda --dtype bf16 --model vit_b16 --batch 64 --rank 8 \
  --warmup 10 --steps 15 --forms delta --runs eager compile --time_budget 100 --out "$OUT" >"$OUT/vit_b16.log" 2>&1
log "vit_b16 exit $?"

# SD1.5 UNet, batch 4, 64x64 latents, r=4: every method, eager then torch.compile (what fits in the budget)
log "sd15_unet (cap 175 s)"
timeout 175 $PY benchmarks/train_step.py --device cuda --dtype bf16 --model sd15_unet --batch 4 --rank 4 \
  --warmup 10 --steps 15 --runs eager compile --time_budget 140 --out "$OUT" >"$OUT/sd15_unet.log" 2>&1
log "sd15_unet exit $?"
log "done; files: $(ls "$OUT" | tr '\n' ' ')"
