"""Where things live, under one root prefix.

Everything the updater touches is derived from a :class:`Layout`, so tests and the demo run inside a
folder (``--root``) exactly as on a real host. Two version-directory styles exist:

- ``seed`` (the user-facing docs): ``/usr/lib/hal0/current -> /usr/lib/hal0-<version>/``
- ``hal0`` (what hal0's code really does): ``/usr/lib/hal0/current -> /usr/lib/hal0/hal0-<version>/``

Links are written with *relative* targets so that a tree under a root prefix stays self-consistent;
absolute targets written by other tools are read back under the root prefix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["VERSION_DIR_PREFIX", "Layout", "LayoutStyle"]

LayoutStyle = Literal["seed", "hal0"]
VERSION_DIR_PREFIX = "hal0-"
STAGING_PREFIX = ".hal0-staging-"
TRASH_PREFIX = ".hal0-trash-"


@dataclass(frozen=True)
class Layout:
    """Paths of one hal0 installation. ``root`` is ``/`` on a real host."""

    root: Path
    style: LayoutStyle = "seed"
    lib_dir_rel: str = "usr/lib/hal0"
    config_rel: str = "etc/hal0/hal0.toml"
    state_dir_rel: str = "var/lib/watchdog-updater"

    @property
    def lib_dir(self) -> Path:
        """Holds the ``current`` and ``previous`` links."""
        return self.root / self.lib_dir_rel

    @property
    def versions_dir(self) -> Path:
        """Holds the ``hal0-<version>`` directories (and staging dirs, same filesystem)."""
        return self.lib_dir.parent if self.style == "seed" else self.lib_dir

    @property
    def current_link(self) -> Path:
        return self.lib_dir / "current"

    @property
    def previous_link(self) -> Path:
        return self.lib_dir / "previous"

    @property
    def config_path(self) -> Path:
        return self.root / self.config_rel

    @property
    def state_dir(self) -> Path:
        """The updater's own state: journal, history, quarantine, lock, cache. Never hal0's data."""
        return self.root / self.state_dir_rel

    @property
    def cache_dir(self) -> Path:
        """Per-version cache of manifest, bundles and tarball: a rollback never needs the network."""
        return self.state_dir / "cache"

    @property
    def lock_path(self) -> Path:
        return self.state_dir / "lock"

    def version_dir(self, version: str) -> Path:
        return self.versions_dir / f"{VERSION_DIR_PREFIX}{version}"

    def staging_dir(self, txid: str) -> Path:
        return self.versions_dir / f"{STAGING_PREFIX}{txid}"

    def link_target_for(self, version: str) -> str:
        """The relative target a ``current``/``previous`` link gets for ``version``."""
        return os.path.relpath(self.version_dir(version), self.lib_dir)

    def resolve_link_target(self, target: str) -> Path:
        """Map a link target (relative, or absolute as another tool wrote it) into this root."""
        if os.path.isabs(target):
            return self.root / target.lstrip("/")
        return self.lib_dir / target

    def version_of_dir(self, path: Path) -> str | None:
        """``hal0-1.2.3`` -> ``1.2.3``; None for anything that is not a version dir here."""
        name = path.name
        if path.parent.resolve() != self.versions_dir.resolve():
            return None
        if not name.startswith(VERSION_DIR_PREFIX):
            return None
        return name[len(VERSION_DIR_PREFIX) :] or None
