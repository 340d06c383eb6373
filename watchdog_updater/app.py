"""Wiring: build the updater's parts from a configuration and a layout.

Shared by the CLI and the daemon so that both assemble exactly the same object graph. Heavy
dependencies (httpx, sigstore, pystemd) are imported only when a part is first used, which keeps
read-only commands fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from watchdog_updater.config import Config
from watchdog_updater.journal import Journal, read_boot_id
from watchdog_updater.layout import Layout
from watchdog_updater.lock import UpdateLock
from watchdog_updater.releases import ReleaseSource
from watchdog_updater.services import ServiceManager
from watchdog_updater.state import StateStore
from watchdog_updater.updater import Reporter, Updater, ignore_events

__all__ = ["App", "layout_for"]


def layout_for(root: Path, config: Config) -> Layout:
    return Layout(root=root, style=config.layout)


@dataclass
class App:
    """Everything a command needs, created lazily."""

    config: Config
    layout: Layout
    boot_id: str

    @classmethod
    def create(cls, root: Path, config: Config) -> App:
        return cls(config=config, layout=layout_for(root, config), boot_id=read_boot_id())

    @property
    def store(self) -> StateStore:
        return StateStore(self.layout.state_dir)

    @property
    def journal(self) -> Journal:
        return Journal(self.layout.state_dir, boot_id=self.boot_id)

    def lock(self, purpose: str = "update") -> UpdateLock:
        return UpdateLock(self.layout.lock_path, purpose=purpose)

    def services(self) -> ServiceManager:
        from watchdog_updater.services import make_service_manager

        return make_service_manager(self.config.services.manager)

    def source(self) -> ReleaseSource:
        from watchdog_updater.fetch import Fetcher
        from watchdog_updater.trust import BundleVerifier

        download = self.config.download
        fetcher = Fetcher(download.fetch, ca_file=download.ca_file)
        verifier = BundleVerifier.for_spec(self.config.verify.trusted_root)
        return ReleaseSource(
            self.config,
            fetcher=fetcher,
            verifier=verifier,
            store=self.store,
            cache_dir=self.layout.cache_dir,
        )

    def updater(self, reporter: Reporter = ignore_events) -> Updater:
        return Updater(
            self.config,
            self.layout,
            journal=self.journal,
            store=self.store,
            services=self.services,
            source=self.source,
            reporter=reporter,
        )
