"""Store rows → the JSON shapes of OpenAI's File, FineTuningJob, event and checkpoint objects."""

from __future__ import annotations

HYPERPARAMETERS = ("batch_size", "learning_rate_multiplier", "n_epochs")


def file_object(f: dict) -> dict:
    return {"id": f["id"], "object": "file", "bytes": f["bytes"], "created_at": f["created_at"],
            "filename": f["filename"], "purpose": f["purpose"], "status": "processed", "status_details": None,
            "expires_at": f.get("expires_at")}


def upload_object(u: dict, file: dict | None = None) -> dict:
    """OpenAI's Upload (``file``: the File it became once completed)."""
    return {"id": u["id"], "object": "upload", "bytes": u["bytes"], "created_at": u["created_at"],
            "expires_at": u["expires_at"], "filename": u["filename"], "purpose": u["purpose"], "status": u["status"],
            "file": file_object(file) if file else None}


def upload_part_object(p: dict) -> dict:
    return {"id": p["id"], "object": "upload.part", "created_at": p["created_at"], "upload_id": p["upload_id"]}


def job_object(j: dict, queue_position: int | None = None) -> dict:
    """OpenAI's FineTuningJob, plus ``queue_position`` (1: starts next; None unless queued). The
    hyperparameters are the numbers used once the job has started ("auto" until then, as at OpenAI)."""
    method = j["method"] or {"type": "supervised", "supervised": {"hyperparameters": {}}}
    hyper = method.get(method["type"], {}).get("hyperparameters", {})
    return {
        "id": j["id"], "object": "fine_tuning.job", "created_at": j["created_at"], "error": j["error"],
        "fine_tuned_model": j["fine_tuned_model"], "finished_at": j["finished_at"],
        "hyperparameters": {k: hyper.get(k, "auto") for k in HYPERPARAMETERS},
        "model": j.get("parent_model") or j["model"], "organization_id": "org-tunesmith",
        "result_files": j["result_files"] or [],
        "seed": j["seed"], "status": j["status"], "trained_tokens": j["trained_tokens"],
        "training_file": j["training_file"], "validation_file": j["validation_file"],
        "estimated_finish": j.get("estimated_finish") if j["status"] == "running" else None,
        "integrations": j.get("integrations"), "metadata": j["metadata"], "method": method, "user_provided_suffix": j["suffix"],
        "queue_position": queue_position if j["status"] == "queued" else None,
    }


def event_object(e: dict) -> dict:
    return {"id": e["id"], "object": "fine_tuning.job.event", "created_at": e["created_at"], "level": e["level"],
            "message": e["message"], "data": e["data"], "type": e["type"]}


def checkpoint_object(c: dict) -> dict:
    return {"id": c["id"], "object": "fine_tuning.job.checkpoint", "created_at": c["created_at"],
            "fine_tuned_model_checkpoint": c["fine_tuned_model_checkpoint"], "fine_tuning_job_id": c["job_id"],
            "metrics": c["metrics"], "step_number": c["step_number"]}


def page(items: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": items, "has_more": has_more,
            "first_id": items[0]["id"] if items else None, "last_id": items[-1]["id"] if items else None}
