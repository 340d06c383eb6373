"""Retention: which old versions to delete (pure), and deleting them safely (I/O).

Policy (:func:`plan_gc`): the newest ``keep`` installed versions (by ``order_key``) that are not
quarantined are kept, and so is every protected version (``current``, ``previous``, a transaction's
target, the versions a probation window may return to) however old; every other installed version
is deleted. Protected versions do not take a slot of ``keep``, so rolling back to an old version
never costs a recent one; nor do quarantined ones, which are never installed again and would
otherwise push a good rollback target out.

Deletion (:func:`collect_garbage`): each version dir is first renamed to a ``.hal0-trash-*`` name
(and the rename made durable), then deleted, so a crash mid-delete never leaves a half version dir
under its real name; crash recovery removes trash dirs. Its cache entry (``cache_dir/<version>``)
goes the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Set
from pathlib import Path
from typing import Any

from watchdog_updater.errors import InstallError
from watchdog_updater.extract import remove_tree
from watchdog_updater.layout import Layout
from watchdog_updater.links import installed_versions, move_to_trash, read_link_version

__all__ = ["collect_garbage", "plan_gc"]


def plan_gc(
    installed: Sequence[str],
    *,
    keep: int,
    protected: Set[str],
    order_key: Callable[[str], Any],
    quarantined: Set[str] = frozenset(),
) -> list[str]:
    """The installed versions to delete, oldest first.

    Invariants (tests/test_retention.py checks them with hypothesis):
    - nothing protected and nothing not installed is ever returned, and no version twice;
    - the newest ``keep`` distinct installed versions that are not quarantined are never returned;
    - every other installed version that is not protected is returned;
    - so at most ``keep`` unprotected versions remain afterwards, none of them quarantined.
    Ties in ``order_key`` are broken by the version string, so the plan is deterministic.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    newest_first = sorted(set(installed), key=lambda v: (order_key(v), v), reverse=True)
    keepers = {v for v in newest_first if v not in quarantined}
    kept = set(sorted(keepers, key=lambda v: (order_key(v), v), reverse=True)[:keep])
    return [v for v in reversed(newest_first) if v not in kept and v not in protected]


def collect_garbage(
    layout: Layout,
    *,
    keep: int,
    protected: Set[str],
    order_key: Callable[[str], Any],
    cache_dir: Path | None = None,
    quarantined: Set[str] = frozenset(),
) -> list[str]:
    """Delete what :func:`plan_gc` selects, with their cache entries; returns those versions.

    The versions ``current`` and ``previous`` point at are protected even if the caller forgot
    them; if either link cannot be read, nothing is deleted (:class:`InstallError`).
    """
    guarded = set(protected)
    for link in (layout.current_link, layout.previous_link):
        version = read_link_version(layout, link)
        if version is not None:
            guarded.add(version)
    doomed = plan_gc(
        installed_versions(layout),
        keep=keep,
        protected=guarded,
        order_key=order_key,
        quarantined=quarantined,
    )
    for version in doomed:
        _delete(layout.version_dir(version))
        if cache_dir is not None:
            _delete(cache_dir / version)
    return doomed


def _delete(path: Path) -> None:
    try:
        trash = move_to_trash(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise InstallError(f"cannot remove {path}: {e.strerror or e}") from e
    try:
        remove_tree(trash)
    except OSError as e:
        raise InstallError(
            f"cannot remove {trash} (was {path}): {e.strerror or e}",
            hint="recovery removes leftover trash dirs on the next start",
        ) from e
