"""The second process of ``diffalign run`` (``diffalign.pipeline.jobs``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from diffalign.pipeline.jobs import SideJobs, done


def _threads() -> int:
    return torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads():
    """Whatever a test (or a SideJobs it failed inside) does to torch's thread count, the
    tests after it in this worker run on the count they started with."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _signal_then_sleep(started: str, seconds: float) -> None:
    """A job that says it runs (its pid in the file ``started``), then sleeps."""
    import time

    Path(started).write_text(str(os.getpid()))
    time.sleep(seconds)


def _wait_for_file(release: str, timeout: float) -> int:
    """A job that stays busy until the file ``release`` exists; returns its pid."""
    import time

    deadline = time.monotonic() + timeout
    while not Path(release).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} never appeared")
        time.sleep(0.01)
    return os.getpid()


def _wait_until(predicate, timeout: float = 30.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return _is_zombie(pid)


def test_disabled_side_jobs_run_each_job_at_once_here():
    with SideJobs(False) as jobs:
        fut = jobs.submit(os.getpid)
        assert fut.done() and fut.result() == os.getpid()
        with pytest.raises(ValueError, match="bad value"):
            jobs.submit(_fail, "bad value")
    assert done(3).result() == 3


def test_side_jobs_run_in_another_process_with_one_thread_each():
    torch.set_num_threads(2)  # what a run starts with on the README's two cores
    with SideJobs(True) as jobs:
        assert _threads() == 1  # this process gives up its second thread meanwhile
        pid, threads = jobs.submit(os.getpid), jobs.submit(_threads)
        bad = jobs.submit(_fail, "bad value")
        assert pid.result() != os.getpid() and threads.result() == 1
        with pytest.raises(ValueError, match="bad value"):
            bad.result()
    assert _threads() == 2


def test_side_jobs_stop_the_worker_when_the_main_process_fails(tmp_path):
    import time

    started = tmp_path / "started"
    with pytest.raises(RuntimeError, match="main failed"):
        with SideJobs(True) as jobs:
            slow = jobs.submit(_signal_then_sleep, str(started), 60)
            assert _wait_until(started.exists), "the slow job never started"
            worker = int(started.read_text())
            t0 = time.perf_counter()
            raise RuntimeError("main failed")
    assert time.perf_counter() - t0 < 30  # did not wait for the sleeping job
    assert _wait_until(lambda: _gone(worker)), f"the worker {worker} still runs"
    # the stopped job ends as failed (the pool is broken), not as finished
    assert slow.exception(timeout=30) is not None


def test_main_process_keeps_one_thread_while_the_worker_lives(tmp_path):
    # the main process's arithmetic must not depend on whether the worker is idle: it runs
    # on one thread from the worker's start to its end, then gets its threads back
    torch.set_num_threads(2)
    release = tmp_path / "release"
    with SideJobs(True) as jobs:
        assert _threads() == 1
        jobs.submit(os.getpid).result()  # the worker is up and idle
        jobs.poll()
        assert _threads() == 1
        busy = jobs.submit(_wait_for_file, str(release), 60)
        jobs.poll()
        assert _threads() == 1 and not busy.done()
        release.write_text("go")
        busy.result(timeout=60)
        jobs.poll()
        assert _threads() == 1
    assert _threads() == 2
    with SideJobs(False) as jobs:  # no worker: threads are never touched
        jobs.submit(os.getpid)
        jobs.poll()
        assert _threads() == 2


_KILLED_MAIN = """
import os, sys, time
from diffalign.pipeline.jobs import SideJobs
jobs = SideJobs(True)
print(jobs.submit(os.getpid).result(), flush=True)
jobs.submit(time.sleep, 120)
time.sleep(120)
"""


@pytest.mark.skipif(not os.sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_worker_dies_with_a_main_process_killed_by_a_signal():
    import signal
    import subprocess
    import sys

    main = subprocess.Popen([sys.executable, "-c", _KILLED_MAIN], stdout=subprocess.PIPE,
                            text=True)
    try:
        worker = int(main.stdout.readline())
        os.kill(worker, 0)  # alive, sleeping in its job
        main.send_signal(signal.SIGKILL)  # no chance to stop its pool
        main.wait(timeout=30)
        if not _wait_until(lambda: _gone(worker)):
            os.kill(worker, signal.SIGKILL)
            pytest.fail("the worker outlived its killed main process")
    finally:
        if main.poll() is None:
            main.kill()


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False
