"""A fine-tuning script as OpenAI's fine-tuning guide writes it, unchanged but for where it connects.

`OpenAI()` reads OPENAI_BASE_URL and OPENAI_API_KEY from the environment, so the same file runs against
OpenAI or against `tunesmith serve`:

    tunesmith serve --model-alias gpt-4o-mini-2024-07-18=smollm2-135m-instruct &
    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=local python examples/openai_migration.py

See docs/openai-migration.md. Optional arguments: the training file and the model.
"""

import base64
import io
import sys
import time

from openai import OpenAI


def main(training_path: str = "examples/data/banking_chat_12.jsonl", model: str = "gpt-4o-mini-2024-07-18") -> str:
    client = OpenAI()

    # 1. Upload the training file
    with open(training_path, "rb") as fh:
        training_file = client.files.create(file=fh, purpose="fine-tune")
    print("uploaded", training_file.id, training_file.filename)

    # 2. Create the fine-tuning job ("auto" hyperparameters; OpenAI reports the numbers used once it runs)
    job = client.fine_tuning.jobs.create(
        training_file=training_file.id,
        model=model,
        suffix="banking",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": "auto"}}},
        metadata={"project": "support-intents"},
    )
    print("created", job.id, job.status)

    # 3. Follow it until it finishes
    while job.status in ("validating_files", "queued", "running"):
        time.sleep(2)
        job = client.fine_tuning.jobs.retrieve(job.id)
    if job.status != "succeeded":
        raise SystemExit(f"job {job.id} {job.status}: {job.error}")
    for event in reversed(client.fine_tuning.jobs.list_events(fine_tuning_job_id=job.id, limit=5).data):
        print("event:", event.message)
    print("hyperparameters used:", job.method.supervised.hyperparameters.to_dict())
    print("trained tokens:", job.trained_tokens)

    # 4. Checkpoints and the step metrics file
    for checkpoint in client.fine_tuning.jobs.checkpoints.list(job.id).data:
        print("checkpoint", checkpoint.fine_tuned_model_checkpoint, checkpoint.metrics.train_loss)
    content = client.files.content(job.result_files[0]).read()
    results = base64.b64decode(content).decode()  # the cookbook decodes the results file as base64
    last = io.StringIO(results).readlines()[-1].strip()
    print("results file: last row", last)

    # 5. Use the fine-tuned model, beside the base model
    question = [{"role": "system", "content": "Classify the customer message. Answer with one label: card_arrival, "
                 "pin_blocked, age_limit."}, {"role": "user", "content": "My new card has not come yet"}]
    for name in (model, job.fine_tuned_model):
        completion = client.chat.completions.create(model=name, messages=question, max_tokens=8, temperature=0)
        print(f"{name}: {completion.choices[0].message.content!r}")
    response = client.responses.create(model=job.fine_tuned_model, instructions=question[0]["content"],
                                       input=question[1]["content"], max_output_tokens=16)
    print("responses API:", repr(response.output_text))
    print("fine-tuned model:", job.fine_tuned_model)
    return job.fine_tuned_model


if __name__ == "__main__":
    main(*sys.argv[1:3])
