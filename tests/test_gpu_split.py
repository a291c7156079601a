"""One GPU, two tenants, on a simulated device budget (no GPU needed): vLLM's share becomes its
--gpu-memory-utilization, the jobs worker holds every job to the rest and refuses one that cannot fit."""

import openai
import pytest

from tunesmith.errors import ConfigError, TrainingError
from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine
from tunesmith.serve.engines.gpu_split import GIB, plan_split
from tunesmith.serve.engines.vllm.server import VllmLaunch, vllm_command
from tunesmith.serve.jobs.worker import work
from tunesmith.serve.launch import share_the_gpu, start_worker

from .conftest import banking_rows, chat_lines, running_server


def test_the_split_gives_vllm_its_share_and_the_jobs_the_rest_less_a_margin():
    split = plan_split(80 * GIB, 0.4)
    assert split.vllm_bytes == 32 * GIB and split.jobs_bytes == 44 * GIB  # 80 - 32 - 4 (5% kept free)
    assert "vLLM 32.0 GiB (--gpu-memory-utilization 0.40), jobs 44.0 GiB" in split.describe()
    assert plan_split(None) is None  # no CUDA device: nothing to split
    with pytest.raises(ConfigError, match="--vllm-gpu-share"):
        plan_split(80 * GIB, 0.97)


def test_serve_takes_the_split_and_hands_each_tenant_its_share(monkeypatch, tmp_path):
    monkeypatch.setattr("tunesmith.serve.engines.gpu_split.cuda_total", lambda: 24 * GIB)  # a simulated 24 GiB GPU
    settings = ServeSettings(engine="vllm", vllm_gpu_share=0.6)
    split = share_the_gpu(settings)
    assert settings.gpu_split is split and split.vllm_share == 0.6
    cmd = vllm_command("py", VllmLaunch("/m", "base", gpu_memory_utilization=split.vllm_share), tmp_path)
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.6000"
    started = []
    monkeypatch.setattr("subprocess.Popen", lambda cmd, **kw: started.append(cmd))
    start_worker(tmp_path, gpu_budget_gb=split.jobs_gb)
    assert started[0][started[0].index("--gpu-budget-gb") + 1] == f"{split.jobs_gb:.2f}"
    assert share_the_gpu(ServeSettings(engine="builtin")) is None


def test_the_worker_refuses_a_job_that_does_not_fit_the_jobs_share(tiny_model_dir, tmp_path, monkeypatch):
    """The worker on a simulated GPU: a share smaller than the job's estimate fails it, naming both numbers; a
    share that fits holds the job to it (train.memory_limit_gb)."""
    from tunesmith.serve.jobs import worker

    monkeypatch.setattr(worker, "job_device", lambda recipe: ("cuda", "bfloat16"))
    data_dir = tmp_path / "data"
    engine = Engine(str(tiny_model_dir), {}, wait_ms=5)
    with running_server(create_app(ServeSettings(model=str(tiny_model_dir), data_dir=data_dir), engine)) as url:
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        upload = c.files.create(file=("t.jsonl", chat_lines(banking_rows(("card_arrival",), 4))), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=upload.id)
        work(data_dir, once=True, gpu_budget_gb=0.0001)
        job = c.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "failed"
        assert "GiB of GPU memory" in job.error.message and "share of this GPU is 0.0 GiB" in job.error.message

        held = []

        def train_job(recipe, *args):
            held.append(recipe)
            raise TrainingError("stopped here: the test needs the recipe only")

        monkeypatch.setattr(worker, "train_job", train_job)
        c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=upload.id)
        work(data_dir, once=True, gpu_budget_gb=2.5)
    assert held[0].train.memory_limit_gb == 2.5
