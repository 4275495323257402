"""certdist.sweep.run_jobs: the worker pool behind `certdist reproduce --jobs`."""
import math

import pytest

from certdist.sweep import run_jobs
from certdist.training.loop import TrainingError


def test_results_in_task_order_and_every_failure_named(capsys):
    assert run_jobs(math.sqrt, [9.0, 4.0, 1.0], jobs=2) == [3.0, 2.0, 1.0]
    assert capsys.readouterr().out.count("jobs done") == 3
    with pytest.raises(TrainingError, match=r"2 of 4 jobs failed: -1\.0: ValueError.*-4\.0: ValueError"):
        run_jobs(math.sqrt, [-1.0, 4.0, 16.0, -4.0], jobs=2)  # the others still run to the end
    assert capsys.readouterr().out.count("jobs done") == 2
    assert run_jobs(math.sqrt, [4.0], jobs=1) == [2.0]  # in this process
