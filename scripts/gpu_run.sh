#!/usr/bin/env bash
# On a GPU machine with no network (CPython 3.12, torch and transformers preinstalled): install the parts of
# the kit that scripts/gpu_kit.sh packed and that have arrived under .gpu/, then run a benchmark with them.
# Installed packages go to /tmp/tunesmith-site (Unsloth's part to /tmp/unsloth-site, which only the benchmark's
# Unsloth side puts ahead of it), kept across commands while the machine stays up.
#
#   bash scripts/gpu_run.sh install                     # whatever parts are here (idempotent)
#   bash scripts/gpu_run.sh bench --configs 1b-lora --profile  # benchmarks/gpu_train.py, log in $OUT
#   bash scripts/gpu_run.sh tests                       # tests/test_gpu_varlen.py tests/test_gpu_path.py, log in $OUT
#                                                       # (TESTS_TIMEOUT=150: stopped after 150 s)
#   bash scripts/gpu_run.sh verify                      # the GPU tests, then the check (tunesmith.train.verify), which
#                                                       # writes this GPU kind's record in gpu_verified.json (copy in $OUT)
#   bash scripts/gpu_run.sh quality                     # benchmarks/gpu_quality.py (needs the model), records in $OUT
#   bash scripts/gpu_run.sh engines                     # where the image has vllm: the demo trained, then
#                                                       # benchmarks/generation_engines.py eval and reinforcement
#                                                       # --record (this GPU kind's engine_measured.json, copy in $OUT)
#   bash scripts/gpu_run.sh loss                        # benchmarks/loss_forms.py
#   bash scripts/gpu_run.sh tinker                      # benchmarks/tinker_trainer.py at 1B LoRA: the Tinker trainer's
#                                                       # the engine's sampling against a per-sequence generate loop, and
#                                                       # four tenants fused into one step against one after another
#                                                       # and peft's mixed-adapter batch (calls of 2, 4, 8 examples)
#   bash scripts/gpu_run.sh python -m pytest -q tests/test_target_head.py  # anything, with the kit's paths
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/tunesmith-site
UNSLOTH_SITE=/tmp/unsloth-site
KEPT=/tmp/tunesmith-kit  # data, tokenizer and model, copied out of .gpu/ (a later command may not carry them)
OUT=${OUT:-/tmp/tunesmith-out}
mkdir -p "$SITE" "$KEPT" "$OUT"

install_part() {  # install_part PART TARGET: the wheels of .gpu/PART into TARGET, once
  local wheels
  wheels=$(find ".gpu/$1" -name '*.whl' 2>/dev/null || true)
  if [ -n "$wheels" ] && [ ! -f "$KEPT/$1.done" ]; then
    # shellcheck disable=SC2086
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" $wheels
    touch "$KEPT/$1.done"
  fi
}

install() {
  install_part base "$SITE"
  install_part unsloth "$UNSLOTH_SITE"
  [ -f .gpu/base/kit.tar.xz ] && tar -C "$KEPT" -xJf .gpu/base/kit.tar.xz
  [ -f .gpu/model-a/gguf.xz.a ] && cp .gpu/model-a/gguf.xz.a .gpu/model-a/gguf.name "$KEPT/"
  [ -f .gpu/model-b/gguf.xz.b ] && cp .gpu/model-b/gguf.xz.b "$KEPT/"
  if [ -f "$KEPT/gguf.xz.a" ] && [ -f "$KEPT/gguf.xz.b" ] && [ ! -f "$KEPT/model.done" ]; then
    cat "$KEPT/gguf.xz.a" "$KEPT/gguf.xz.b" | xz -d -T0 > "$KEPT/$(cat "$KEPT/gguf.name")"
    paths python3 -m tunesmith models pull smollm2-135m-instruct --source "$KEPT/$(cat "$KEPT/gguf.name")"
    touch "$KEPT/model.done"
  fi
  [ -f "$KEPT/base.done" ] || { echo "gpu_run: no packages installed here (carry .gpu/base)" >&2; exit 3; }
  paths python3 -c "import trl, datasets, peft, transformers, torch; print('kit:', 'torch', torch.__version__,
    'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__,
    'cuda', torch.cuda.is_available())"
}

paths() {  # run "$@" with the kit's packages ahead of the image's, tunesmith from src, the kit's data
  PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TUNESMITH_SHARED_DATA="$KEPT/data" PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$@"
}

case "${1:-}" in
  install) install ;;
  bench) shift
    unsloth=(); [ -f "$KEPT/unsloth.done" ] && unsloth=(--unsloth-site "$UNSLOTH_SITE")
    paths python3 benchmarks/gpu_train.py --tokenizer "$KEPT/tokenizer" "${unsloth[@]}" "$@" 2>&1 | tee -a "$OUT/gpu_train.log" ;;
  tests) shift  # stopped after $TESTS_TIMEOUT seconds (default 600), so that a command's next step still runs
    paths timeout "${TESTS_TIMEOUT:-600}" python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu_varlen.py \
      tests/test_gpu_path.py "$@" 2>&1 | tee -a "$OUT/gpu_tests.log" ;;
  verify) shift
    # the GPU tests, then the check (tunesmith.train.verify): packed rows = one at a time in bf16 on varlen_attn at a
    # 1B-wide shape, the control, the speed over the named baseline, the tests' summary; it alone writes the record
    # (the GPU tests only: tests/test_reference_path.py compares losses at fp32's 1e-5 and is a CPU test; on a GPU it
    # trains in bf16. Stopped after $TESTS_TIMEOUT seconds: a log without pytest's summary counts as a failure)
    set +e
    # what Inductor is told by the image (flex attention's tests failed on an H200 with "no choices exist for
    # backend ... adding ATEN into max_autotune_gemm_backends"): kept in the log beside the failure
    { echo "inductor environment:"; env | grep -i -E "inductor|triton" || echo "  (none set)"; } > "$OUT/gpu_verify.log"
    paths timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu_varlen.py \
      tests/test_gpu_path.py 2>&1 | tee -a "$OUT/gpu_verify.log"
    set -e
    # the examples: the kit's instruction records (the lengths a fine-tuning run meets), else the repository's BANKING77
    examples=(); alpaca="$KEPT/data/instructions/llamafactory_alpaca_en_demo.json"
    [ -f "$alpaca" ] && examples=(--examples "$alpaca")
    paths python3 -m tunesmith.train.verify --tokenizer "$KEPT/tokenizer" --tests-log "$OUT/gpu_verify.log" \
      "${examples[@]}" "$@" 2>&1 | tee -a "$OUT/gpu_verify.log"
    cp src/tunesmith/machine/gpu_verified.json "$OUT/" ;;
  quality) shift; mkdir -p "$OUT/records"
    paths python3 benchmarks/gpu_quality.py --shared "$KEPT/data" --out /tmp/tunesmith-runs --record-to "$OUT/records" "$@" \
      2>&1 | tee -a "$OUT/gpu_quality.log" ;;
  engines) shift  # vLLM from the image, in its own environment (the kit's packages kept out of its path)
    if ! python3 -c "import vllm" 2>/dev/null; then
      echo "gpu_run engines: vllm does not import in this image; nothing measured" | tee -a "$OUT/engines.log"; exit 0
    fi
    printf '#!/bin/sh\nexec env -u PYTHONPATH %s "$@"\n' "$(command -v python3)" > "$KEPT/vllm-python"
    chmod +x "$KEPT/vllm-python"
    paths python3 -m tunesmith train examples/banking77.yaml --set output_dir=/tmp/tunesmith-runs 2>&1 | tee -a "$OUT/engines.log"
    for part in eval reinforcement; do
      TUNESMITH_VLLM_PYTHON="$KEPT/vllm-python" paths python3 benchmarks/generation_engines.py "$part" \
        --run /tmp/tunesmith-runs/banking77-intents --prompts 8 --epochs 1 --record "$@" 2>&1 | tee -a "$OUT/engines.log"
    done
    cp src/tunesmith/machine/engine_measured.json "$OUT/" ;;
  loss) shift; paths python3 benchmarks/loss_forms.py --models "random:llama-3.2-1b?tokenizer=$KEPT/tokenizer" \
          --layers 16 "$@" 2>&1 | tee -a "$OUT/loss_forms.log" ;;
  tinker) shift; paths python3 benchmarks/tinker_trainer.py --model "random:llama-3.2-1b?tokenizer=$KEPT/tokenizer" \
            --sampling-rounds 4 --steps 6 --block 2 --out "$OUT/tinker_trainer.json" "$@" 2>&1 | tee -a "$OUT/tinker_trainer.log" ;;
  "") echo "usage: gpu_run.sh install | tests | verify | bench ARGS | quality ARGS | engines | loss ARGS | tinker ARGS | COMMAND ARGS" >&2
    exit 2 ;;
  *) paths "$@" ;;
esac
