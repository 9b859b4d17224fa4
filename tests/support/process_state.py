"""What a running OS process is ready for, read from Linux's /proc (for tests and tests/support/autoscaler.py, which
SIGTERM real pgflow processes and judge how they exit)."""

from __future__ import annotations

import signal
import subprocess


def handles_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has installed a SIGTERM handler (its bit in SigCgt of /proc/PID/status).

    A pgflow process installs its handler once it has started up; SIGTERMed before that, it dies of the
    signal (exit -15) instead of shutting down cleanly, and that says nothing about its shutdown. The state
    is read rather than guessed from the process's age, which a loaded machine stretches."""
    try:
        with open(f"/proc/{pid}/status") as status:
            caught = next((line.split()[1] for line in status if line.startswith("SigCgt:")), "0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


def terminate(proc: subprocess.Popen) -> bool:
    """Send ``proc`` SIGTERM; return whether it was ready for it (had its handler), also remembered on the
    Popen as ``sigterm_unready`` so that whoever judges its exit code later knows a -15 is no failure."""
    ready = handles_sigterm(proc.pid)
    proc.sigterm_unready = getattr(proc, "sigterm_unready", False) or not ready
    proc.terminate()
    return ready


def died_of_early_sigterm(proc: subprocess.Popen) -> bool:
    """The process exited -15 after a SIGTERM sent (through :func:`terminate`) before it had its handler."""
    return proc.returncode == -signal.SIGTERM and getattr(proc, "sigterm_unready", False)
