"""From configuration to a concrete health gate.

The probes themselves live in :mod:`watchdog_updater.health`; this module decides which ones a gate
runs on this host: restarted units, slots, HTTP endpoints and commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from watchdog_updater.config import Config
    from watchdog_updater.health.probes import Probe
    from watchdog_updater.services import ServiceManager

__all__ = ["build_probes"]


def build_probes(config: Config, services: ServiceManager, *, root: Path) -> list[Probe]:
    """The probes of one gate. Call right after the restart: unit baselines are taken now."""
    from watchdog_updater.health.probes import (
        CommandProbe,
        HttpProbe,
        UnitProbe,
        discover_slots,
    )

    health = config.health
    timeout = health.gate.probe_timeout_s
    probes: list[Probe] = [UnitProbe(services, u, services.status(u)) for u in health.units]
    if health.slots:
        slots_dir = health.slots_dir or (root / "etc/hal0/slots")
        probes += discover_slots(
            services,
            config.services.slots_pattern,
            ports=health.slot_ports or None,
            slots_dir=slots_dir if slots_dir.is_dir() else None,
            timeout_s=timeout,
        )
    probes += [
        HttpProbe(p.name, p.url, p.expect_status, p.expect_json, p.timeout_s or timeout)
        for p in health.http
    ]
    probes += [CommandProbe(p.name, p.argv, p.timeout_s or timeout) for p in health.command]
    return probes
