"""Whether this process was asked to stop by Ctrl+C (SIGINT) rather than SIGTERM: the fit's interrupt
callback records it, ``lethe``'s exit code reports it (130 for Ctrl+C, 143 for SIGTERM)."""

from __future__ import annotations

_STATE = {"sigint": False}


def mark_sigint() -> bool:
    """Record a Ctrl+C; returns whether one had been recorded before (a second Ctrl+C)."""
    seen = _STATE["sigint"]
    _STATE["sigint"] = True
    return seen


def sigint_received() -> bool:
    return _STATE["sigint"]


# --------------------------------------------------------------------------- child jobs
PARENT_ENV = "LETHE_PARENT_PID"  # set by run_child: the job stops (SIGTERM) when that process dies


def die_with_parent() -> None:
    """Ask the kernel to send this process SIGTERM when the process named in ``$LETHE_PARENT_PID`` dies
    (Linux; elsewhere nothing). ``lethe`` calls it at start, so a benchmark killed mid-run does not leave its
    ``lethe fit`` child training on: the child gets the SIGTERM a user's Ctrl+C would send, saves and stops."""
    import os
    import signal
    import sys

    parent = os.environ.pop(PARENT_ENV, None)  # not inherited: this job's own children (DDP ranks) are its own
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != parent:  # the parent died before the request took hold
        os.kill(os.getpid(), signal.SIGTERM)


def run_child(cmd: list[str], *, check: bool = False, **kwargs):
    """``subprocess.run(cmd, check=check, **kwargs)`` for a ``lethe`` job that must not outlive this process
    (``die_with_parent``)."""
    import os
    import subprocess

    env = {**(kwargs.pop("env", None) or os.environ), PARENT_ENV: str(os.getpid())}
    return subprocess.run(cmd, check=check, env=env, **kwargs)
