"""Bounds of every download (kept apart from :mod:`watchdog_updater.fetch`, so that reading the
configuration does not import the HTTP stack)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["BACKOFF_CAP_S", "FetchSettings"]

BACKOFF_CAP_S = 60.0


@dataclass(frozen=True)
class FetchSettings:
    """Bounds for every fetch. Durations in seconds, sizes in bytes."""

    connect_timeout_s: float = 10.0  # TCP connect and TLS handshake
    read_timeout_s: float = 30.0  # longest wait for any single read (headers or body)
    deadline_s: float = 3600.0  # overall, per file: all attempts, redirects and back-off sleeps
    min_speed_bytes_per_s: int = 1024  # slow-retrieval defence; 0 turns it off
    speed_window_s: float = 30.0  # ...averaged over this sliding window
    max_redirects: int = 5  # redirects followed per request
    retries: int = 3  # extra attempts on transport errors, truncation, 408/429/5xx
    backoff_s: float = 1.0  # first back-off; doubles per retry, jittered, capped at 60 s
    user_agent: str = "watchdog-updater"

    def __post_init__(self) -> None:
        positive = {
            "connect_timeout_s": self.connect_timeout_s,
            "read_timeout_s": self.read_timeout_s,
            "deadline_s": self.deadline_s,
            "speed_window_s": self.speed_window_s,
        }
        for name, value in positive.items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"FetchSettings.{name} must be a positive number, got {value!r}")
        if not (isinstance(self.backoff_s, int | float) and 0 <= self.backoff_s <= BACKOFF_CAP_S):
            raise ValueError(
                f"FetchSettings.backoff_s must be between 0 and {BACKOFF_CAP_S:g}, "
                f"got {self.backoff_s!r}"
            )
        counts = {
            "min_speed_bytes_per_s": self.min_speed_bytes_per_s,
            "max_redirects": self.max_redirects,
            "retries": self.retries,
        }
        for name, count in counts.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"FetchSettings.{name} must be an integer >= 0, got {count!r}")
        if self.max_redirects > 20 or self.retries > 20:
            raise ValueError("FetchSettings.max_redirects and retries must be at most 20")
        ua = self.user_agent
        if not ua or not ua.isprintable() or not ua.isascii():
            raise ValueError(f"FetchSettings.user_agent must be printable ASCII, got {ua!r}")
