"""Named pause points for the fault tests (tests/test_faults.py); inert unless LM_FAULT_PAUSE is set.

`LM_FAULT_PAUSE="point@step[,point@step...]"` makes the process stop at that point of that step, write
"point@step" to the file named by LM_FAULT_FLAG, and wait there (up to LM_FAULT_PAUSE_S seconds, or until a
stop signal arrives), so that a test can send a real SIGKILL / SIGTERM / SIGINT at a known moment. The points:

- "step":       the train step of `step` dispatched (its state donated), not yet checked or saved (mid-step);
- "eval":       during the validation of `step`, after its first batch;
- "ckpt-write": inside orbax's asynchronous save of `step`, after the data is written and before the step
                directory is committed (renamed into place), in orbax's background thread.

A pause only delays; what happens next (a kill) is real.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "LM_FAULT_PAUSE"


def pause(point: str, step: int, should_stop=lambda: False) -> None:
    spec = os.environ.get(ENV)
    if not spec or f"{point}@{int(step)}" not in spec.split(","):
        return
    flag = os.environ.get("LM_FAULT_FLAG")
    if flag:
        tmp = Path(flag + ".tmp")
        tmp.write_text(f"{point}@{int(step)}\n")
        os.replace(tmp, flag)
    deadline = time.monotonic() + float(os.environ.get("LM_FAULT_PAUSE_S", "600"))
    while time.monotonic() < deadline and not should_stop():
        time.sleep(0.02)
