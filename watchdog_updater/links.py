"""Atomic link and directory operations on a :class:`Layout`.

Every change here is one ``rename(2)`` followed by an fsync of the directory holding the name, so a
crash or power cut leaves either the old state or the new one:

- :func:`swap_link` creates the new symlink under a temporary name next to the link and renames it
  over the link; a reader never sees the link missing.
- :func:`promote_staging` renames a complete, flushed staging dir to its version dir. A retained
  copy of the same version is exchanged atomically (``renameat2(RENAME_EXCHANGE)``) where the
  filesystem supports it, then deleted under a trash name.

A ``current`` (or ``previous``) that is a real directory or file, not a link, is refused with
:class:`InstallError`: it was put there by hand and is never deleted by the updater.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Final

from watchdog_updater.errors import InstallError
from watchdog_updater.extract import remove_tree
from watchdog_updater.layout import TRASH_PREFIX, VERSION_DIR_PREFIX, Layout
from watchdog_updater.storage import fsync_dir

__all__ = [
    "TEMP_LINK_PREFIX",
    "clean_temp_links",
    "fsync_dir",
    "installed_versions",
    "move_to_trash",
    "promote_staging",
    "read_link_version",
    "remove_link",
    "swap_link",
]

TEMP_LINK_PREFIX: Final = ".hal0-link-"
_AT_FDCWD: Final = -100
_RENAME_EXCHANGE: Final = 2


def read_link_version(layout: Layout, link: Path) -> str | None:
    """The version ``link`` points at; None if the link does not exist.

    Raises :class:`InstallError` if the link is dangling, points at something that is not a
    version dir of ``layout``, or is not a symlink at all (a real ``current`` directory).
    Absolute targets written by other tools are read under ``layout.root``.
    """
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise _not_a_link(link) from e
        raise InstallError(f"cannot read the link {link}: {e.strerror or e}") from e
    path = layout.resolve_link_target(target)
    version = layout.version_of_dir(path)
    if version is None:
        raise InstallError(
            f"{link} points at {target!r}, which is not a version dir of this installation",
            hint=f"expected a target like {layout.link_target_for('<version>')!r}",
        )
    try:
        st = path.lstat()
    except FileNotFoundError as e:
        raise InstallError(f"{link} is dangling: {target!r} does not exist") from e
    except OSError as e:
        raise InstallError(f"{link}: cannot inspect {path}: {e.strerror or e}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise InstallError(f"{link} points at {target!r}, which is not a directory")
    return version


def swap_link(layout: Layout, link: Path, version: str) -> None:
    """Point ``link`` at ``version``'s dir atomically (temp symlink, rename over, fsync dir).

    Refuses (:class:`InstallError`) to point at a version dir that does not exist, and to
    replace anything that is not a symlink.
    """
    version_dir = layout.version_dir(version)
    try:
        is_dir = stat.S_ISDIR(version_dir.lstat().st_mode)
    except OSError:
        is_dir = False
    if not is_dir:
        raise InstallError(f"refusing to point {link} at {version_dir}: no such version dir")
    _symlink_exists(link)  # anything but a symlink there is refused, never replaced
    target = layout.link_target_for(version)
    parent = link.parent
    tmp = parent / f"{TEMP_LINK_PREFIX}{link.name}-{secrets.token_hex(6)}"
    try:
        if not parent.is_dir():  # first install: make the new dir itself durable too
            parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(parent.parent)
        os.symlink(target, tmp)
        os.rename(tmp, link)
        fsync_dir(parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if e.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.ENOTDIR):
            raise _not_a_link(link) from e
        raise InstallError(f"cannot point {link} at {target}: {e.strerror or e}") from e


def remove_link(link: Path) -> None:
    """Remove the symlink ``link`` if it exists, durably; refuses to remove anything else."""
    if not _symlink_exists(link):
        return
    try:
        link.unlink()
        fsync_dir(link.parent)
    except FileNotFoundError:
        return
    except OSError as e:
        raise InstallError(f"cannot remove {link}: {e.strerror or e}") from e


def promote_staging(staging: Path, version_dir: Path) -> None:
    """Rename the flushed ``staging`` dir to ``version_dir`` and make the rename durable.

    If ``version_dir`` already exists (re-installing a retained version), the two are exchanged
    atomically where the filesystem allows it, so the name never goes missing; elsewhere the old
    dir is first renamed to a trash name. Either way the old tree is deleted under its trash
    name, after the new one is in place.
    """
    try:
        if not stat.S_ISDIR(staging.lstat().st_mode):
            raise InstallError(f"cannot promote {staging}: not a directory")
        try:
            version_dir.lstat()
        except FileNotFoundError:
            os.rename(staging, version_dir)
            _fsync_parents(staging, version_dir)
            return
        if _exchange(staging, version_dir):
            trash = move_to_trash(staging, fsync=False)  # staging now holds the old tree
        else:
            trash = move_to_trash(version_dir, fsync=False)
            os.rename(staging, version_dir)
        _fsync_parents(staging, version_dir)
        remove_tree(trash)
    except OSError as e:
        raise InstallError(f"cannot move {staging} to {version_dir}: {e.strerror or e}") from e


def move_to_trash(path: Path, *, fsync: bool = True) -> Path:
    """Rename ``path`` to a fresh ``.hal0-trash-*`` name in its directory; returns the new path.

    A crash while the caller deletes the trash leaves only a trash name behind, never a
    half-deleted tree under its real name; recovery (:func:`extract.clean_staging`) removes it.
    """
    trash = path.parent / f"{TRASH_PREFIX}{path.name}-{secrets.token_hex(6)}"
    os.rename(path, trash)
    if fsync:
        fsync_dir(path.parent)
    return trash


def installed_versions(layout: Layout) -> list[str]:
    """Versions with a directory in ``layout.versions_dir`` (never staging or trash dirs)."""
    try:
        entries = list(os.scandir(layout.versions_dir))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise InstallError(f"cannot list {layout.versions_dir}: {e.strerror or e}") from e
    versions = [
        entry.name[len(VERSION_DIR_PREFIX) :]
        for entry in entries
        if entry.name.startswith(VERSION_DIR_PREFIX)
        and len(entry.name) > len(VERSION_DIR_PREFIX)
        and entry.is_dir(follow_symlinks=False)
    ]
    return sorted(versions)


def clean_temp_links(layout: Layout) -> list[Path]:
    """Remove temporary symlinks a crash between symlink(2) and rename(2) left in lib_dir."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(layout.lib_dir))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.name.startswith(TEMP_LINK_PREFIX) and entry.is_symlink():
            path = Path(entry.path)
            path.unlink(missing_ok=True)
            removed.append(path)
    return sorted(removed)


def _symlink_exists(link: Path) -> bool:
    """True if ``link`` is a symlink, False if nothing is there; InstallError for anything else."""
    try:
        st = link.lstat()
    except FileNotFoundError:
        return False
    except OSError as e:
        raise InstallError(f"cannot inspect {link}: {e.strerror or e}") from e
    if not stat.S_ISLNK(st.st_mode):
        raise _not_a_link(link)
    return True


def _not_a_link(link: Path) -> InstallError:
    what = "a real directory" if link.is_dir() and not link.is_symlink() else "not a symlink"
    return InstallError(
        f"{link} is {what}; refusing to replace or delete it",
        hint=f"move it aside by hand, then point {link.name} at a version dir",
    )


def _fsync_parents(a: Path, b: Path) -> None:
    fsync_dir(b.parent)
    if a.parent != b.parent:
        fsync_dir(a.parent)


@functools.cache
def _libc_renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # pragma: no cover - glibc < 2.28, or not glibc
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names ``a`` and ``b``; False if this system or filesystem cannot."""
    fn = _libc_renameat2()
    if fn is None:  # pragma: no cover
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
