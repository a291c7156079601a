"""Work beside decoding, on the built-in engine's own thread: a Tinker training call runs there, on the engine's
OpenMP team and every core, and the engine's rows are stepped at the call's turn points: a light tenant's at once,
heavy rows after each slice of the work. A thread of its own would keep a second OpenMP team alive beside the
engine's, and once teams outnumber the cores every team's small products run up to 2x slower
(``tunesmith.serve.lanes.torch_threads``)."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from dataclasses import dataclass, field

from tunesmith.serve.errors import APIError
from tunesmith.serve.lanes import torch_threads

SLICE_S = 0.5  # the work's time between two steps of heavy rows alone (light rows are stepped at every turn point)


@dataclass
class Work:
    """A call handed to the engine's thread (:meth:`Beside.run_beside`)."""

    fn: object
    args: tuple
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down; retry on another instance.", type_="server_error",
                    code="server_shutting_down")


class Beside:
    """The engine's side of work beside decoding (mixed into :class:`tunesmith.serve.engines.builtin.Engine`: its
    ``worker`` thread, ``pending`` queue, ``works``, ``batch``, ``cores``/``threads`` and steps)."""

    def run_beside(self, fn, *args):
        """``fn(*args)`` on the engine's thread between two steps, and its answer (or exception): torch work beside
        decoding (a Tinker training call) on the engine's OpenMP team, every core; a team of its own would slow both
        (``lanes.torch_threads``). Rows in flight or arriving are stepped at its turn points (:meth:`step_between`)."""
        if threading.current_thread() is self.worker:
            return fn(*args)
        if self.closed:
            raise shutting_down()
        work = Work(fn, args)
        self.pending.put(work)
        return work.done.result()

    def step_between(self) -> bool:
        """From work on the engine's thread (:meth:`run_beside`), at a turn point of its own: the rows in flight and
        arrived stepped, so that decoding waits for a stretch of the work, not all of it; whether a step ran. A light
        tenant's rows (a chat, a small sample) are stepped until they end: interactive decoding comes first, as it
        did when the work ran at ``nice`` 19 on a core of its own. Heavy rows alone get a step once the work has run
        :data:`SLICE_S`, or as long as the last such step took if longer: a training call shorter than that is not cut
        (another key's 0.46 s call beside a 64-row sample took 3.1x when cut at every step's length), and a longer one
        shares the thread with the sample (a 64-row step of 0.3 s does not run at each of a pass's 120 turn points)."""
        if threading.current_thread() is not self.worker:
            return False
        ran = False
        try:
            while True:
                self._take_pending(block=False)
                light = self.shares.light_running
                if not self.batch.busy or (not light and time.monotonic() - self.stepped_at < max(self.step_s,
                                                                                                     SLICE_S)):
                    break
                started = time.monotonic()
                self._step_once()
                ran = True
                if not light:
                    self.stepped_at = time.monotonic()
                    self.step_s = self.stepped_at - started
                    break
        except BaseException as exc:  # noqa: BLE001 - the rows in flight hear of it, the work goes on
            for row in self.batch.abort():
                row.request.push(row.index, exc)
        finally:
            self._every_core()
        return ran

    def _every_core(self) -> None:
        if self.threads != self.cores:
            torch_threads(self.cores)
            self.threads = self.cores

    def _run_works(self) -> None:
        """The work handed to this thread (:meth:`run_beside`), in order, on every core."""
        while self.works:
            work = self.works.popleft()
            self._every_core()
            self.stepped_at, self.step_s = time.monotonic(), 0.0  # its first turn point may step the rows
            try:
                work.done.set_result(work.fn(*work.args))
            except BaseException as exc:  # noqa: BLE001 - raised in the thread that handed it
                work.done.set_exception(exc)
