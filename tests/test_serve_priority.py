"""``priority.lower_other_threads``: the server's event loop ahead of its other threads (run in a subprocess, so
that the test process's own threads keep their priority)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="per-thread priorities are Linux's")

SCRIPT = """
import json, os, threading
from e5lite.serve.priority import lower_other_threads

ready, done, tids = threading.Event(), threading.Event(), []
def worker():
    tids.append(threading.get_native_id())
    ready.set()
    done.wait()
t = threading.Thread(target=worker)
t.start()
ready.wait()
lowered = lower_other_threads(7)
again = lower_other_threads(7)  # already there: nothing to lower
later = []
t2 = threading.Thread(target=lambda: later.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
t2.start(); t2.join()
print(json.dumps({"lowered": lowered, "again": again,
                  "worker": os.getpriority(os.PRIO_PROCESS, tids[0]),
                  "me": os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
                  "created_by_me_later": later[0]}))
done.set()
t.join()
"""


def test_every_other_thread_is_lowered_and_the_caller_keeps_its_priority():
    base = os.getpriority(os.PRIO_PROCESS, 0)
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["lowered"] >= 1 and got["again"] == 0
    assert got["worker"] == max(base, 7) and got["me"] == base and got["created_by_me_later"] == base
