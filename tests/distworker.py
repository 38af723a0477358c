"""A worker body for the launcher tests, in a module light to import (spawned workers import it)."""

from __future__ import annotations

import os
import signal
import time

from loram.errors import LoramError


def hold_or_fail(how: str) -> None:
    """Rank 1 fails as ``how`` says (raise, kill) or returns (ok); rank 0 returns on ``ok`` and
    otherwise waits far longer than any test (it must be stopped, not waited for)."""
    if os.environ["RANK"] == "1":
        if how == "raise":
            raise LoramError("bad thing on rank 1")
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        return
    if how != "ok":
        time.sleep(600)
