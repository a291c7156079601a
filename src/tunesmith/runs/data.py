"""The data stage of a run, once per run however many processes train it."""

from __future__ import annotations

from pathlib import Path

from tunesmith.machine.launch import file_lock, is_main, main_process_first, rank, world_size


def prepare_data_once(recipe, data_dir: Path, console):
    """The data stage, run once: rank 0 builds it into ``data_dir`` under a file lock while the other ranks
    wait; they then read the same examples from the data cache into a scratch folder (nothing of theirs
    lands in the run folder). With one process this is plain :func:`tunesmith.data.prepare.prepare`."""
    import tempfile

    from tunesmith.data.prepare import prepare

    if world_size() <= 1:
        return prepare(recipe, data_dir, console)
    with main_process_first():
        if is_main():
            with file_lock(data_dir.parent / ".data.lock"):
                return prepare(recipe, data_dir, console)
        with tempfile.TemporaryDirectory(prefix=f"tunesmith-rank{rank()}-") as tmp:
            data = prepare(recipe, Path(tmp) / "data", console)
            for name in data.splits:  # read the splits while their file is there (it goes with the scratch folder)
                data.splits[name]
            return data
