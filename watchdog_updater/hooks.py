"""Activation hooks: commands run against the new tree right after the swap.

hal0 reinstalls the new tree into its venv after a swap; a ``post_swap`` hook does the same here, and
a failing hook makes the updater swap back. Each hook gets a hard timeout and its whole process group
is killed when it overruns.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from watchdog_updater.errors import HookError

__all__ = ["run_hooks"]

_TAIL_BYTES = 2000


def run_hooks(
    commands: Sequence[Sequence[str]],
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout_s: float,
) -> None:
    """Run each command in order; the first failure raises :class:`HookError` with its output tail."""
    for argv in commands:
        try:
            proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env={**os.environ, **env},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            raise HookError(f"activation hook {argv[0]!r} could not start: {e}") from e
        try:
            output, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise HookError(
                f"activation hook {' '.join(argv)!r} timed out after {timeout_s:g} s; swapped back",
                hint="raise update.install.hook_timeout or fix the hook",
            ) from None
        if proc.returncode != 0:
            tail = output[-_TAIL_BYTES:].decode(errors="replace").strip()
            raise HookError(
                f"activation hook {' '.join(argv)!r} exited {proc.returncode}; swapped back"
                + (f"\n{tail}" if tail else ""),
                hint="the previous version is current again; fix the hook or the release",
            )
