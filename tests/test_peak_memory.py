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

