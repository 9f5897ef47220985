"""Named points in long jobs where a fault-injection test can pause the process to kill it.

``RECOMMENDER_PAUSE_AT="write:5"`` makes the job print ``checkpoint write`` to stderr and sleep
5 seconds when it reaches the ``write`` point, so a test can SIGKILL it exactly there.
Unset (always, outside tests) a checkpoint costs one dictionary lookup.
"""

from __future__ import annotations

import os
import sys
import time

ENVIRONMENT_VARIABLE = "RECOMMENDER_PAUSE_AT"


def checkpoint(name: str) -> None:
    """Pauses here if ``RECOMMENDER_PAUSE_AT`` names this point (``NAME:SECONDS``)."""
    wanted = os.environ.get(ENVIRONMENT_VARIABLE)
    if not wanted:
        return
    point, _, seconds = wanted.partition(":")
    if point == name:
        print(f"checkpoint {name}", file=sys.stderr, flush=True)
        time.sleep(float(seconds or 30))
