"""The second process of ``diffalign run`` (``diffalign.pipeline.jobs``)."""

from __future__ import annotations

import os

import pytest
import torch

from diffalign.pipeline.jobs import SideJobs, done


def _threads() -> int:
    return torch.get_num_threads()


def _fail(msg: str) -> None:
    raise ValueError(msg)


def test_disabled_side_jobs_run_each_job_at_once_here():
    with SideJobs(False) as jobs:
        fut = jobs.submit(os.getpid)
        assert fut.done() and fut.result() == os.getpid()
        with pytest.raises(ValueError, match="bad value"):
            jobs.submit(_fail, "bad value")
    assert done(3).result() == 3


def test_side_jobs_run_in_another_process_with_one_thread_each():
    before = _threads()
    with SideJobs(True) as jobs:
        assert _threads() == 1  # this process gives up its second thread meanwhile
        pid, threads = jobs.submit(os.getpid), jobs.submit(_threads)
        bad = jobs.submit(_fail, "bad value")
        assert pid.result() != os.getpid() and threads.result() == 1
        with pytest.raises(ValueError, match="bad value"):
            bad.result()
    assert _threads() == before


def test_side_jobs_stop_the_worker_when_the_main_process_fails():
    import time

    with pytest.raises(RuntimeError, match="main failed"):
        with SideJobs(True) as jobs:
            jobs.submit(os.getpid).result()  # the worker is up
            slow = jobs.submit(time.sleep, 60)
            time.sleep(0.5)
            t0 = time.perf_counter()
            raise RuntimeError("main failed")
    assert time.perf_counter() - t0 < 30  # did not wait for the sleeping job
    # the stopped job ends as failed (the pool is broken), not as finished
    assert slow.exception(timeout=30) is not None


def test_poll_gives_the_threads_back_only_when_the_worker_is_idle():
    before = _threads()
    torch.set_num_threads(2)
    try:
        _poll_gives_the_threads_back()
    finally:  # later tests run on the suite's one thread again
        torch.set_num_threads(before)


def _poll_gives_the_threads_back():
    import time

    with SideJobs(True) as jobs:
        jobs.submit(os.getpid).result()  # the worker is up
        assert _threads() == 1
        jobs.poll()
        assert _threads() == 2  # nothing running: both threads back
        busy = jobs.submit(time.sleep, 1.0)
        assert _threads() == 1
        jobs.poll()
        assert _threads() == 1  # the worker is busy: still one
        busy.result()
        jobs.poll()
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
    import time

    main = subprocess.Popen([sys.executable, "-c", _KILLED_MAIN], stdout=subprocess.PIPE,
                            text=True)
    try:
        worker = int(main.stdout.readline())
        os.kill(worker, 0)  # alive, sleeping in its job
        main.send_signal(signal.SIGKILL)  # no chance to stop its pool
        main.wait(timeout=30)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break  # gone
            if _is_zombie(worker):
                break
            time.sleep(0.2)
        else:
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
