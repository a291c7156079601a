"""Progress without a terminal (log files, CI): a plain line per tenth of the work, never silent."""

import io

from rich.console import Console

from tunesmith.progress import task_bar


def test_non_terminal_progress_prints_a_line_per_tenth_with_the_latest_info():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False)
    with task_bar(console, "train", 95) as advance:
        for step in range(1, 96):
            advance(1, f"loss {1 / step:.3f}")
    lines = buf.getvalue().splitlines()
    assert 10 <= len(lines) <= 11
    assert lines[-1].startswith("train: 95/95 loss 0.011 ·") and "ETA 0:00:00" in lines[-1]
    assert all(line.startswith("train: ") for line in lines)


def test_a_resumed_bar_starts_at_its_checkpoint_and_times_only_the_work_left(monkeypatch):
    """A run resumed at step 60 of 100 shows 60 done at once; its ETA comes from the steps this process
    ran (1 s each here), not from 60 steps that seemed to take no time."""
    now = [0.0]
    monkeypatch.setattr("tunesmith.progress.time.monotonic", lambda: now[0])
    buf = io.StringIO()
    with task_bar(Console(file=buf, force_terminal=False), "train", 100) as advance:
        advance(0, "resumed at step 60", skip=60)
        for _ in range(20):
            now[0] += 1.0
            advance(1)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("train: 60/100 resumed at step 60 ·") and "ETA" not in lines[0]
    assert lines[1].startswith("train: 70/100") and lines[1].endswith("0:00:10 elapsed, ETA 0:00:30")
    assert lines[-1].startswith("train: 80/100") and lines[-1].endswith("0:00:20 elapsed, ETA 0:00:20")


def test_a_resumed_terminal_bar_starts_at_its_checkpoint():
    console = Console(file=io.StringIO(), force_terminal=True)
    with task_bar(console, "train", 100) as advance:
        advance(0, "resumed", skip=60)
        advance(5)
    assert "65/100" in console.file.getvalue()
