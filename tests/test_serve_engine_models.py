"""The served model names under threads: the event loop lists and resolves them while worker threads load and delete
fine-tunes (resolved by name from planning threads, ``DELETE /v1/models`` off the loop). On the built-in engine
with real LoRA adapters: no reader ever meets a half-changed registry, a fine-tune added by several threads at
once is loaded once, deleted by several at once is unloaded once, and what is left is exactly what was served."""

from __future__ import annotations

import sys
import threading

import pytest

from tunesmith.serve.engines.builtin import Engine, peft_name

NAMES = [f"ft:Qwen2.5-0.5B:race.{i}:ftjob-{i}" for i in range(4)]  # dots: PEFT refuses them in its own names


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """One small LoRA adapter of the tiny model (served under several names)."""
    from transformers import AutoModelForCausalLM

    from tunesmith.config import LoraSection
    from tunesmith.models.loading import wrap_adapter

    folder = tmp_path_factory.mktemp("race-adapter")
    wrap_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "lora",
                 LoraSection(r=2, alpha=4, dropout=0.0), seed=1).save_pretrained(folder)
    return folder


@pytest.fixture
def switching_often():
    """Threads switch every microsecond instead of every 5 ms, so that a window between a check and a change that
    another thread could slip into is met within a few hundred rounds, not once in a long while."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def hammer(engine: Engine, adapter_dir, rounds: int) -> list[BaseException]:
    """Four writer threads add and delete the same fine-tunes at once, one reader lists and resolves the served
    models meanwhile; the errors any of them met."""
    errors: list[BaseException] = []
    start, done = threading.Barrier(5), threading.Event()

    def writer(offset: int) -> None:
        try:
            start.wait()
            for r in range(rounds):
                name = NAMES[(r + offset) % len(NAMES)]
                if r % 2 == 0:
                    engine.add_adapter(name, adapter_dir)
                else:
                    engine.remove_adapter(name)
        except BaseException as exc:  # noqa: BLE001 - the test reports what a thread met
            errors.append(exc)

    def reader() -> None:
        try:
            start.wait()
            while not done.is_set():
                ids = engine.model_ids()
                assert ids[0] == engine.base_name and len(ids) == len(set(ids)), ids
                for m in ids:
                    engine.served_name(m)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    watcher = threading.Thread(target=reader)
    for t in [*writers, watcher]:
        t.start()
    for t in writers:
        t.join(300)
    done.set()
    watcher.join(30)
    return errors


def test_adding_and_deleting_fine_tunes_from_threads_while_the_models_are_listed(tiny_model_dir, adapter_dir,
                                                                                switching_often):
    engine = Engine(str(tiny_model_dir), {}, max_batch=2, wait_ms=1)
    try:
        errors = hammer(engine, adapter_dir, rounds=40)
        assert not errors, [f"{type(e).__name__}: {e}" for e in errors]
        served = set(engine.model_ids()) - {engine.base_name}
        assert served == set(engine.adapters)
        # what PEFT holds is exactly what the engine says it serves: no adapter loaded twice or left behind
        held = set(getattr(engine.model, "peft_config", {})) if engine.adapters else set()
        assert held == {peft_name(n) for n in served}, (held, served)
        for name in list(served):
            assert engine.remove_adapter(name)
        assert engine.model_ids() == [engine.base_name]
    finally:
        engine.close()


class JobsSeam:
    """The store's model lookups (the seam ServedModels reads): succeeded jobs by fine-tuned model name."""

    def __init__(self, jobs: dict[str, dict]):
        self.jobs = jobs

    def job_by_model(self, name: str) -> dict | None:
        return self.jobs.get(name)

    def checkpoint_by_model(self, name: str) -> None:
        return None

    def fine_tunes_of(self, owner) -> list[dict]:
        return [j for j in self.jobs.values() if j["owner"] == owner and not j["model_deleted"]]

    def sampler_checkpoint_by_model(self, name: str) -> None:
        return None

    def sampler_checkpoints_of(self, owner) -> list[dict]:
        return []


def test_fine_tunes_load_on_first_use_and_the_least_recently_used_is_evicted(tiny_model_dir, adapter_dir, tmp_path):
    from tunesmith.serve.api.served_models import ServedModels

    jobs = {}
    for i, name in enumerate(NAMES):
        run = tmp_path / f"run{i}"
        (run / "train").mkdir(parents=True)
        (run / "train" / "adapter").symlink_to(adapter_dir)
        jobs[name] = {"fine_tuned_model": name, "owner": "k1", "status": "succeeded", "model_deleted": 0,
                      "run_dir": str(run), "parent_model": None}
    engine = Engine(str(tiny_model_dir), {}, max_batch=2, wait_ms=1)
    try:
        models = ServedModels(engine, JobsSeam(jobs), capacity=2, in_use_s=0.0)
        assert models.listed("k1") == [engine.base_name, *NAMES]  # listed from the store, none loaded yet
        assert engine.model_ids() == [engine.base_name]
        assert not models.resolve(NAMES[0], "k2")  # another key's: refused, not loaded
        assert engine.model_ids() == [engine.base_name]
        for name in NAMES[:3]:
            assert models.resolve(name, "k1")
        assert set(engine.model_ids()) == {engine.base_name, NAMES[1], NAMES[2]}  # the first one evicted
        assert models.resolve(NAMES[1], "k1")  # used again: now the most recent
        assert models.resolve(NAMES[0], "k1")  # loaded again by name; the least recently used (2) goes
        assert set(engine.model_ids()) == {engine.base_name, NAMES[0], NAMES[1]}
        jobs[NAMES[0]]["model_deleted"] = 1  # deleted through another replica
        assert not models.resolve(NAMES[0], "k1") and NAMES[0] not in engine.model_ids()
        busy = ServedModels(engine, JobsSeam(jobs), capacity=1, in_use_s=3600.0)
        assert busy.resolve(NAMES[2], "k1") and busy.resolve(NAMES[3], "k1")
        assert {NAMES[2], NAMES[3]} <= set(engine.model_ids())  # asked within the request timeout: never evicted
    finally:
        engine.close()
