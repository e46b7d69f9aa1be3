"""The run lock under contention: many processes taking over one stale lock, exactly one wins."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys

import pytest

from selfsup.runguard import LOCK, RunLock
from selfsup.errors import TrainingError

PROCESSES, ROUNDS = 16, 60


def _contender(out: str, rank: int, barrier, results, dead_pid: int) -> None:
    for r in range(ROUNDS):
        if rank == 0:  # a stale lock: a dead process of this host
            with open(os.path.join(out, LOCK), "w") as f:
                json.dump({"pid": dead_pid, "host": socket.gethostname(), "since": "x"}, f)
        barrier.wait()  # everyone starts the take-over together
        lock = RunLock(out)
        try:
            lock.acquire()
        except TrainingError as e:
            results.put((r, rank, "refused", str(e)))
        else:
            results.put((r, rank, "won", ""))
        barrier.wait()  # the winner holds the lock until every contender has tried
        lock.release()
        barrier.wait()


def test_many_processes_taking_over_a_stale_lock_exactly_one_wins_each_round(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=_contender, args=(str(tmp_path), i, barrier, results, dead.pid))
             for i in range(PROCESSES)]
    for p in procs:
        p.start()
    got = [results.get(timeout=30) for _ in range(PROCESSES * ROUNDS)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for r in range(ROUNDS):
        outcome = [g for g in got if g[0] == r]
        winners = [g for g in outcome if g[2] == "won"]
        assert len(outcome) == PROCESSES and len(winners) == 1, (r, winners)
        # every loser names the winner, not the dead process whose lock was taken over
        assert all(f"pid {dead.pid} " not in g[3] and "is in use by another run" in g[3]
                   for g in outcome if g[2] == "refused")
    assert not (tmp_path / LOCK).exists()


def test_a_lock_held_in_this_process_refuses_a_second_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(TrainingError, match=f"pid {os.getpid()} on"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released: free again
        pass


def test_a_killed_owner_leaves_a_stale_lock_that_is_taken_over(tmp_path):
    code = ("import sys, time; from selfsup.runguard import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(TrainingError, match=f"pid {child.pid} on"):  # alive: refused
            RunLock(tmp_path).acquire()
    finally:
        child.kill()
        child.wait()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == child.pid  # SIGKILL left the file behind
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
