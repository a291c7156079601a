"""Run lm-evaluation-harness's evaluations in one process (one import of the harness for several runs) and print
each run's per-item responses as JSON: ``python tests/lm_eval_runs.py SPEC.json``, where the spec holds the task
folder and the runs (name, model, model_args, task, apply_chat_template). tests/test_harness_scoring.py starts it."""

import json
import sys

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager


def main(spec_path: str) -> None:
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    tasks = TaskManager(include_path=spec["include_path"], include_defaults=False)
    out = {}
    for run in spec["runs"]:
        results = simple_evaluate(model=run["model"], model_args=run["model_args"], tasks=[run["task"]],
                                  device="cpu", task_manager=tasks, log_samples=True,
                                  apply_chat_template=run.get("apply_chat_template", False))
        out[run["name"]] = {s["doc_id"]: s["resps"] for s in results["samples"][run["task"]]}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
