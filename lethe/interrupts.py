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
