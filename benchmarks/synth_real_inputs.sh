#!/bin/bash
# Every synth example on its real inputs with the embedded model, constrained, small limits.
# PYTHON defaults to python (the environment tunesmith is installed in).
# Usage: SHARED=/path/to/shared/data bash benchmarks/synth_real_inputs.sh   (default ../shared/data)
# Writes runs/synth-real/<name>/synth/{items,rejected}.jsonl and stats.json; docs/synth_results.md records a run.
mkdir -p "$(dirname "$0")/../runs/synth-real"
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a shared 2-core machine: one thread per process (oversubscribed OpenMP threads were >10x slower)
S=${SHARED:-../shared/data}
PY="${PYTHON:-python} -m tunesmith synth"
OUT="--set output_dir=runs/synth-real"
run() { name=$1; shift; echo "=== $name $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"; s=$(date +%s);
  /usr/bin/time -f "peak_rss_kb=%M" $PY "$@" $OUT --set name=$name > runs/synth-real/$name.log 2>&1; echo "rc=$? seconds=$(( $(date +%s) - s ))"; }
run paraphrase-korquad examples/synth_paraphrase_korquad.yaml --set synth.input=$S/korquad/korquad_v1_dev_shared.json --set synth.limit=4 --set synth.paraphrase.n=2 --set synth.sampling.max_tokens=120
run qa-docs-en examples/synth_docs_qa.yaml --set synth.input=examples/data/docs --set synth.limit=3 --set synth.qa_from_documents.pairs_per_chunk=2 --set synth.sampling.max_tokens=320
run qa-docs-ko-pdf examples/synth_docs_qa.yaml --set synth.input=$S/documents/korquad_2.0_paper_ko.pdf --set synth.language=ko --set synth.limit=3 --set synth.qa_from_documents.pairs_per_chunk=2 --set synth.sampling.max_tokens=320
run seed-questions-ko examples/synth_seed_questions_ko.yaml --set synth.input=$S/realestate_ko/seed_words.txt --set synth.seed_questions.contexts=$S/documents/korquad_2.0_paper_ko.pdf --set synth.limit=3 --set synth.seed_questions.questions_per_seed=2 --set synth.sampling.max_tokens=120
run evol-instruct examples/synth_evol_instruct.yaml --set synth.input=$S/instructions/stanford_alpaca_seed_tasks.jsonl --set synth.limit=4 --set synth.evol_instruct.depth=1 --set synth.sampling.max_tokens=120
run preference-pairs examples/synth_preference_pairs.yaml --set synth.input=$S/instructions/llamafactory_alpaca_en_demo.json --set synth.limit=4 --set synth.sampling.max_tokens=96
echo "=== done $(date +%T)"
