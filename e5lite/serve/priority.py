"""The event loop first: under a flood, accepting, parsing and refusing must not wait behind a model call.

On a machine whose cores the model's threads keep busy, the event loop gets its share of a core only as one
runnable thread among many, so a 429 that takes the handler microseconds reaches its client hundreds of
milliseconds late (the clients see the time before the handler runs, which the server's own histograms do
not). ``serve`` therefore lowers the priority of every other thread of the process once the batch worker has
started, to the nice value ``--compute-nice`` (at nice 10 a thread weighs 110 against the loop's 1024 in Linux's
scheduler): the model's, XLA's pools, the tokenising threads there are by then. The loop keeps the server's
priority. When the loop is idle, which is most of the time, the model still has every core; priorities only
decide who waits when both want one. Raising a thread's nice value needs no privilege; per-thread priorities
are Linux's (on other systems nothing changes).
"""

from __future__ import annotations

import os
import threading


def lower_other_threads(nice: int) -> int:
    """Every thread of this process but the calling one at nice ``nice`` at least (a higher nice value is a
    lower priority); returns how many were lowered. Threads created later inherit their creator's value."""
    tasks = "/proc/self/task"
    if not hasattr(os, "setpriority") or not os.path.isdir(tasks):
        return 0
    me, lowered = threading.get_native_id(), 0
    for name in os.listdir(tasks):
        tid = int(name)
        if tid == me:
            continue
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)  # on Linux, PRIO_PROCESS with a thread id is the thread
                lowered += 1
        except OSError:  # the thread ended meanwhile, or a sandbox forbids it: the loop just gets no head start
            continue
    return lowered
