"""Kill the run, not half of it: a worker started by `accelerate launch` ends when its launcher dies.

`accelerate launch` (torch's elastic agent) forwards SIGINT/SIGTERM to its workers, but a SIGKILL of
the launcher alone leaves them running, holding the GPU and writing checkpoints nobody waits for.
On Linux each worker asks the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG); elsewhere
it checks its parent at each call of `parent_alive`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_ORIGINAL_PARENT = os.getppid()


def launched_worker() -> bool:
    """Whether this process is a worker of `accelerate launch` / torchrun (they set LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def exit_with_parent() -> bool:
    """Under a launcher, have the kernel send SIGTERM to this process when the launcher dies; True if armed."""
    if not launched_worker():
        return False
    if not parent_alive():  # the launcher died before we got here
        os.kill(os.getpid(), signal.SIGTERM)
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if not parent_alive():  # it died between the check and the prctl call
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def parent_alive() -> bool:
    """Whether the process that started this one is still its parent (else it has died)."""
    return os.getppid() == _ORIGINAL_PARENT
