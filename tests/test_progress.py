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
