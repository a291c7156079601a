"""Progress bars on long work (model conversion, training steps, evaluation) with rich.

On a terminal a live bar; in a log file or CI (no terminal) a plain line at every tenth of the
work, so long runs are not silent there either.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def make_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


@contextmanager
def task_bar(console: Console, description: str, total: int):
    """Yield ``advance(n, info="", grow=0, skip=0)`` for one bar that lives for the ``with`` block
    (``grow`` adds work found on the way to the total, e.g. re-asked calls; ``skip`` marks work done
    before the bar began, e.g. the steps behind a resumed checkpoint: shown as done, left out of the ETA)."""
    if not console.is_terminal:
        yield _line_printer(console, description, total)
        return
    with make_progress(console) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str | None = None, grow: int = 0, skip: int = 0) -> None:
            if info is not None:
                progress.update(task, info=info)
            if grow:
                progress.update(task, total=(progress.tasks[0].total or 0) + grow)
            if skip:  # a reset clears the speed samples, so the skipped work does not count as fast work
                progress.reset(task, completed=progress.tasks[0].completed + skip)
            progress.advance(task, n)

        yield advance


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _line_printer(console: Console, description: str, total: int):
    """``advance`` for a console that is not a terminal: one line per tenth of ``total`` (and the last)."""
    start, state = time.monotonic(), {"done": 0, "skipped": 0, "info": "", "printed": -1, "total": total}

    def advance(n: int = 1, info: str | None = None, grow: int = 0, skip: int = 0) -> None:
        if info is not None:
            state["info"] = info
        state["total"] += grow
        state["skipped"] += skip
        state["done"] += n + skip
        total, done = state["total"], state["done"]
        tenth = done * 10 // max(total, 1)
        if tenth <= state["printed"] and done < total and not skip:
            return
        state["printed"] = tenth
        elapsed, worked = time.monotonic() - start, done - state["skipped"]
        eta = f", ETA {_clock(elapsed / worked * (total - done))}" if worked else ""
        info_part = f" {state['info']}" if state["info"] else ""
        console.print(f"{description}: {done}/{total}{info_part} · {_clock(elapsed)} elapsed{eta}",
                      highlight=False, markup=False, soft_wrap=True)

    return advance


@contextmanager
def rate_bar(console: Console, description: str, every: float = 5.0):
    """Yield ``update(rows, fraction, info="")`` for work whose size is known only as a share (bytes read):
    rows/s and an ETA from that share. On a terminal a live bar; elsewhere a line at the first update, then
    at most one every ``every`` seconds, and the last."""
    start, state = time.monotonic(), {"printed": None, "line": ""}

    def line(rows: int, fraction: float, info: str) -> str:
        elapsed = time.monotonic() - start
        eta = f", ETA {_clock(elapsed * (1 - fraction) / fraction)}" if 0 < fraction < 1 else ""
        extra = f" · {info}" if info else ""
        return (f"{description}: {rows:,} rows ({fraction:.0%}) · {rows / max(elapsed, 1e-9):,.0f} rows/s{extra}"
                f" · {_clock(elapsed)} elapsed{eta}")

    if console.is_terminal:
        with make_progress(console) as progress:
            task = progress.add_task(description, total=1000, info="")

            def update(rows: int, fraction: float, info: str = "") -> None:
                elapsed = time.monotonic() - start
                extra = f" · {info}" if info else ""
                progress.update(task, completed=int(fraction * 1000),
                                info=f"{rows:,} rows · {rows / max(elapsed, 1e-9):,.0f} rows/s{extra}")

            yield update
        return

    def update(rows: int, fraction: float, info: str = "") -> None:
        now = time.monotonic()
        state["line"] = line(rows, fraction, info)
        if state["printed"] is None or now - state["printed"] >= every or fraction >= 1:
            state["printed"] = now
            console.print(state["line"], highlight=False, markup=False, soft_wrap=True)
            state["line"] = ""

    yield update
    if state["line"]:
        console.print(state["line"], highlight=False, markup=False, soft_wrap=True)
