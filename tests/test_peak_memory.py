"""Each training reports its own peak memory, not that of an earlier, larger arm in the same process."""

import gc

import numpy as np

from tunesmith.train.trainer import peak_memory_mb, process_peak_memory_mb, reset_peak_memory


def test_a_reset_starts_a_new_peak_below_an_earlier_larger_one():
    big = np.ones(400 * 2**20 // 8)  # 400 MB, every page written: an earlier arm's model and optimizer
    peak_big = peak_memory_mb()
    del big
    gc.collect()
    assert peak_memory_mb() >= peak_big - 1  # freeing does not lower a high-water mark
    reset_peak_memory()
    assert peak_memory_mb() < peak_big - 300
    assert process_peak_memory_mb() >= peak_big - 1  # the run's own peak survives the reset



def test_a_training_that_never_logged_still_reports_the_peak_it_ended_with():
    from pathlib import Path

    from tunesmith.train.result import TrainResult

    result = TrainResult(Path("x"), "adapter", [], 1.0, 10, 1, 2, 1, 1, None, end_peak_mb=512.0)
    assert result.peak_memory_mb == 512.0
    logged = TrainResult(Path("x"), "adapter", [{"peak_memory_mb": 900.0}], 1.0, 10, 1, 2, 1, 1, None, end_peak_mb=512.0)
    assert logged.peak_memory_mb == 900.0
