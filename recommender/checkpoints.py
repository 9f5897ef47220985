"""Named points in long jobs where a fault-injection test can pause the process to kill it.

``RECOMMENDER_PAUSE_AT="write:5"`` makes the job print ``checkpoint write`` to stderr and sleep
5 seconds when it reaches the ``write`` point, so a test can SIGKILL it exactly there.
``RECOMMENDER_KILL_ONCE_AT="NAME:MARKER"`` makes the process that reaches ``NAME`` first
SIGKILL itself after creating the file ``MARKER``; later arrivals (a restarted Ray actor
retrying the batch) find the marker and go on. It is how a test kills an actor mid-batch.
Unset (always, outside tests) a checkpoint costs two dictionary lookups.
"""

from __future__ import annotations

import os
import signal
import sys
import time

ENVIRONMENT_VARIABLE = "RECOMMENDER_PAUSE_AT"
KILL_ONCE_VARIABLE = "RECOMMENDER_KILL_ONCE_AT"


def checkpoint(name: str) -> None:
    """Pauses here if ``RECOMMENDER_PAUSE_AT`` names this point (``NAME:SECONDS``)."""
    kill = os.environ.get(KILL_ONCE_VARIABLE)
    if kill:
        point, _, marker = kill.partition(":")
        if point == name and marker:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                print(f"checkpoint {name}: killing process {os.getpid()}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
    wanted = os.environ.get(ENVIRONMENT_VARIABLE)
    if not wanted:
        return
    point, _, seconds = wanted.partition(":")
    if point == name:
        print(f"checkpoint {name}", file=sys.stderr, flush=True)
        time.sleep(float(seconds or 30))
