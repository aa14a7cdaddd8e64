"""A sandbox held by two processes (a test and the `vpcnictl lab` verbs it runs):
neither loses what the other started, so the last cleanup kills everything."""

from __future__ import annotations

import os

import pytest

from vpcni.lab.netns import Sandbox, _start_time

pytestmark = pytest.mark.functional


def test_two_holders_of_a_state_file_keep_each_others_processes(tmp_path):
    state = tmp_path / "box.sandbox.json"
    first = Sandbox(root_dir=tmp_path / "root", state_file=state)
    started = []
    try:
        a = first.netns("a").spawn("sleep", "600")
        started.append(a)
        # Another process's view (restored from the file) starts one too...
        second = Sandbox.restore(state)
        b = second.namespaces["a"].spawn("sleep", "600")
        started.append(b)
        # ...and the first, which never heard of it, changes the state afterwards.
        first.netns("b")
        first.kill_pid(a.pid)
        # A third holder, as `vpcnictl lab down` is, finds and kills the other's.
        last = Sandbox.restore(state)
        assert b.pid in last.processes and a.pid not in last.processes
        last.cleanup()
        b.wait(timeout=10)
        assert _start_time(b.pid) is None
        assert not state.exists()
    finally:
        first.cleanup()
        for proc in started:
            if proc.poll() is None:
                os.kill(proc.pid, 9)
