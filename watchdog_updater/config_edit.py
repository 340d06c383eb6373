"""`config edit` with visudo semantics: edit a temporary copy, validate it, replace atomically.

The original file is never touched until the edited copy parses and validates; an invalid edit
offers to re-open the editor or to abort, and aborting leaves the original exactly as it was.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from watchdog_updater.config import parse_config
from watchdog_updater.errors import ConfigError
from watchdog_updater.storage import atomic_write_bytes

__all__ = ["EditOutcome", "edit_config", "editor_command"]

EditOutcome = str  # "saved", "unchanged" or "aborted"


def editor_command(visual: str | None, editor: str | None) -> list[str]:
    """$VISUAL, then $EDITOR, then vi (as hal0's own `config edit`), split like a shell would."""
    for candidate in (visual, editor):
        if candidate and candidate.strip():
            return shlex.split(candidate)
    return ["vi"]


def edit_config(
    path: Path,
    *,
    editor: Sequence[str],
    ask: Callable[[str], str],
    report: Callable[[str], None],
) -> EditOutcome:
    """Run the editor on a copy of ``path`` until it validates or the operator aborts."""
    try:
        original = path.read_bytes()
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        original, mode = b"", 0o644
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.edit-", suffix=".toml")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(original)
        while True:
            try:
                result = subprocess.run([*editor, str(tmp)], check=False)
            except OSError as e:
                raise ConfigError(
                    f"cannot start the editor {editor[0]!r}: {e}",
                    hint="set $VISUAL or $EDITOR to an installed editor",
                ) from e
            if result.returncode != 0:
                report(f"the editor exited {result.returncode}; {path} is unchanged")
                return "aborted"
            edited = tmp.read_bytes()
            if edited == original:
                return "unchanged"
            try:
                parse_config(edited.decode("utf-8"), source=path)
            except (ConfigError, UnicodeDecodeError) as e:
                report(e.diagnostics() if isinstance(e, ConfigError) else f"not UTF-8: {e}")
                answer = ask("What now? (e)dit again, (a)bort and keep the original: ")
                if answer.strip().lower().startswith("e"):
                    continue
                report(f"aborted; {path} is unchanged")
                return "aborted"
            atomic_write_bytes(path, edited, mode=mode)
            return "saved"
    finally:
        tmp.unlink(missing_ok=True)
