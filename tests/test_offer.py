"""The pure release decisions: manifest freshness (replay/freeze) and "should I install this now?"."""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from watchdog_updater.errors import FreshnessError
from watchdog_updater.manifest import Manifest, parse_manifest
from watchdog_updater.releases import Offer, check_freshness, evaluate_offer
from watchdog_updater.state import ChannelMemory, Holds, QuarantineEntry
from watchdog_updater.versions import Version, parse_version

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
NOW_S = NOW.timestamp()
HOUR = 3600.0


def manifest(version: str = "1.5.0", **fields: Any) -> Manifest:
    document: dict[str, Any] = {
        "_schema": "hal0.releases.v1",
        "version": version,
        "url": f"https://releases.hal0.dev/hal0-{version}.tar.gz",
        "bundle_url": f"https://releases.hal0.dev/hal0-{version}.tar.gz.bundle",
        "digest_sha256": "ab" * 32,
        "signer_identity": f"https://github.com/Hal0ai/hal0/.github/workflows/release.yml@refs/tags/v{version}",
        **fields,
    }
    return parse_manifest(json.dumps(document).encode(), channel="stable")


def memory(version: str, signed_at: float = NOW_S - HOUR) -> ChannelMemory:
    return ChannelMemory(version, "cd" * 32, signed_at=signed_at, accepted_at=signed_at + 1)


def fresh(
    m: Manifest,
    *,
    signed_at: float = NOW_S,
    remembered: ChannelMemory | None = None,
    allow_downgrade: bool = False,
) -> None:
    check_freshness(
        m, signed_at=signed_at, remembered=remembered, allow_downgrade=allow_downgrade, now=NOW_S
    )


def quarantined(version: str) -> dict[str, QuarantineEntry]:
    return {version: QuarantineEntry(version, "ab" * 32, "hal0-api", "gate failed", "fail", 1.0)}


def offer(
    m: Manifest,
    installed: str | None = "1.4.0",
    *,
    quarantine: dict[str, QuarantineEntry] | None = None,
    holds: Holds | None = None,
    min_release_age_s: float = 0.0,
    allow_downgrade: bool = False,
    force: bool = False,
) -> Offer:
    inst: Version | None = parse_version(installed) if installed else None
    return evaluate_offer(
        m,
        installed=inst,
        channel="stable",
        quarantine=quarantine or {},
        holds=holds or Holds(),
        min_release_age_s=min_release_age_s,
        allow_downgrade=allow_downgrade,
        now=NOW_S,
        force=force,
    )


# --------------------------------------------------------------------------- check_freshness


def test_first_manifest_on_a_channel_is_accepted() -> None:
    fresh(manifest("1.5.0"), remembered=None)


def test_newer_version_is_accepted() -> None:
    fresh(manifest("1.5.0"), remembered=memory("1.4.0"))


def test_newer_version_with_older_signature_is_accepted() -> None:
    fresh(manifest("1.5.0"), signed_at=0.0, remembered=memory("1.4.0", signed_at=NOW_S))


def test_expired_manifest_is_refused() -> None:
    expired = (NOW - timedelta(seconds=1)).isoformat()
    with pytest.raises(FreshnessError, match="expired"):
        fresh(manifest(expires=expired))


def test_expired_manifest_is_refused_even_with_allow_downgrade() -> None:
    with pytest.raises(FreshnessError, match="expired"):
        fresh(manifest(expires="2024-01-01T00:00:00Z"), allow_downgrade=True)


def test_unexpired_manifest_is_accepted() -> None:
    fresh(manifest(expires=(NOW + timedelta(hours=1)).isoformat()))


def test_replayed_older_version_is_refused() -> None:
    with pytest.raises(FreshnessError, match=r"1\.5\.0"):
        fresh(manifest("1.4.0"), remembered=memory("1.5.0"))


def test_replayed_rc_after_its_final_is_refused() -> None:
    m = parse_manifest(
        json.dumps(
            {
                "_schema": "hal0.releases.v1",
                "version": "1.5.0-rc.3",
                "channel": "preview",
                "url": "https://x/a.tgz",
                "bundle_url": "https://x/a.tgz.bundle",
                "digest_sha256": "ab" * 32,
                "signer_identity": "id",
            }
        ).encode(),
        channel="preview",
    )
    with pytest.raises(FreshnessError):
        fresh(m, remembered=memory("1.5.0"))


def test_same_version_with_older_signature_is_refused() -> None:
    with pytest.raises(FreshnessError, match="replayed"):
        fresh(manifest("1.5.0"), signed_at=NOW_S - 2 * HOUR, remembered=memory("1.5.0", NOW_S))


def test_same_version_with_same_or_newer_signature_is_accepted() -> None:
    fresh(manifest("1.5.0"), signed_at=NOW_S, remembered=memory("1.5.0", NOW_S))
    fresh(manifest("1.5.0"), signed_at=NOW_S + 1, remembered=memory("1.5.0", NOW_S))


def test_allow_downgrade_bypasses_the_replay_check() -> None:
    fresh(manifest("1.4.0"), remembered=memory("1.5.0"), allow_downgrade=True)
    fresh(
        manifest("1.5.0"),
        signed_at=0.0,
        remembered=memory("1.5.0", NOW_S),
        allow_downgrade=True,
    )


# --------------------------------------------------------------------------- evaluate_offer


def test_newer_release_is_available() -> None:
    result = offer(manifest("1.5.0"), "1.4.0")
    assert result.available
    assert result.installed == "1.4.0"
    assert result.channel == "stable"
    assert result.candidate is not None and str(result.candidate.version) == "1.5.0"


def test_nothing_installed_is_available() -> None:
    result = offer(manifest("1.5.0"), None)
    assert result.available
    assert result.installed is None


def test_up_to_date() -> None:
    result = offer(manifest("1.5.0"), "1.5.0")
    assert not result.available
    assert "up to date" in result.reason


def test_final_after_its_rc_is_an_upgrade() -> None:
    assert offer(manifest("1.5.0"), "1.5.0-rc.2").available


def test_revoked_is_not_offered() -> None:
    result = offer(manifest(revoked=True, revoked_reason="eats data"))
    assert not result.available
    assert "revoked" in result.reason
    assert "eats data" in result.reason


def test_downgrade_is_refused() -> None:
    result = offer(manifest("1.4.0"), "1.5.0")
    assert not result.available
    assert "older" in result.reason


def test_downgrade_allowed_when_configured() -> None:
    assert offer(manifest("1.4.0"), "1.5.0", allow_downgrade=True).available


def test_upgrade_from_excludes_installed() -> None:
    result = offer(manifest(upgrade_from=">=1.4.5"), "1.4.0")
    assert not result.available
    assert "upgrade_from" in result.reason


def test_upgrade_from_admits_installed() -> None:
    assert offer(manifest(upgrade_from=">=1.4,<1.5"), "1.4.0").available


def test_frozen_blocks_updates() -> None:
    result = offer(manifest(), holds=Holds(frozen_reason="rollback unhealthy", frozen_at=1.0))
    assert not result.available
    assert "frozen" in result.reason
    assert "rollback unhealthy" in result.reason


def test_paused_forever_blocks_updates() -> None:
    result = offer(manifest(), holds=Holds(paused_until=math.inf, pause_reason="demo day"))
    assert not result.available
    assert "paused" in result.reason
    assert "demo day" in result.reason


def test_paused_until_future_blocks_updates() -> None:
    result = offer(manifest(), holds=Holds(paused_until=NOW_S + HOUR))
    assert not result.available
    assert "paused" in result.reason


def test_paused_until_past_no_longer_blocks() -> None:
    assert offer(manifest(), holds=Holds(paused_until=NOW_S - 1)).available


def test_skipped_version_is_not_offered() -> None:
    result = offer(manifest("1.5.0"), holds=Holds(skipped=("1.5.0",)))
    assert not result.available
    assert "skipped" in result.reason


def test_skipping_another_version_does_not_block() -> None:
    assert offer(manifest("1.5.0"), holds=Holds(skipped=("1.4.9",))).available


def test_quarantined_version_is_not_offered() -> None:
    result = offer(manifest("1.5.0"), quarantine=quarantined("1.5.0"))
    assert not result.available
    assert "quarantined" in result.reason
    assert "gate failed" in result.reason


def test_newer_release_moves_past_quarantine() -> None:
    assert offer(manifest("1.5.1"), quarantine=quarantined("1.5.0")).available


def test_too_young_for_min_release_age() -> None:
    m = manifest(released_at=(NOW - timedelta(hours=1)).isoformat())
    result = offer(m, min_release_age_s=2 * HOUR)
    assert not result.available
    assert "too young" in result.reason


def test_old_enough_for_min_release_age() -> None:
    m = manifest(released_at=(NOW - timedelta(hours=3)).isoformat())
    assert offer(m, min_release_age_s=2 * HOUR).available


def test_no_min_release_age_offers_a_brand_new_release() -> None:
    assert offer(manifest(released_at=NOW.isoformat()), min_release_age_s=0).available


HOLDS_ALL = Holds(
    paused_until=math.inf,
    skipped=("1.5.0",),
    frozen_reason="manual attention",
    frozen_at=1.0,
)


def test_force_ignores_holds_quarantine_and_cooldown() -> None:
    m = manifest("1.5.0", released_at=NOW.isoformat())
    blocked = offer(m, quarantine=quarantined("1.5.0"), holds=HOLDS_ALL, min_release_age_s=HOUR)
    assert not blocked.available
    forced = offer(
        m, quarantine=quarantined("1.5.0"), holds=HOLDS_ALL, min_release_age_s=HOUR, force=True
    )
    assert forced.available


@pytest.mark.parametrize(
    ("holds", "quarantine", "age"),
    [
        (Holds(frozen_reason="x"), {}, 0.0),
        (Holds(paused_until=math.inf), {}, 0.0),
        (Holds(skipped=("1.5.0",)), {}, 0.0),
        (Holds(), quarantined("1.5.0"), 0.0),
        (Holds(), {}, HOUR),
    ],
    ids=["frozen", "paused", "skipped", "quarantined", "too-young"],
)
def test_force_ignores_each_hold(
    holds: Holds, quarantine: dict[str, QuarantineEntry], age: float
) -> None:
    m = manifest("1.5.0", released_at=NOW.isoformat())
    assert not offer(m, holds=holds, quarantine=quarantine, min_release_age_s=age).available
    assert offer(m, holds=holds, quarantine=quarantine, min_release_age_s=age, force=True).available


def test_force_does_not_ignore_revoked() -> None:
    result = offer(manifest(revoked=True), force=True)
    assert not result.available
    assert "revoked" in result.reason


def test_force_does_not_ignore_upgrade_from() -> None:
    result = offer(manifest(upgrade_from=">=1.4.5"), "1.4.0", force=True)
    assert not result.available
    assert "upgrade_from" in result.reason


def test_offer_to_json_describes_the_candidate() -> None:
    m = manifest("1.5.0", released_at="2024-06-01T00:00:00Z", notes_url="https://n")
    doc = offer(m).to_json()
    assert doc["available"] is True
    assert doc["installed"] == "1.4.0"
    assert doc["candidate"] == {
        "version": "1.5.0",
        "channel": "stable",
        "released_at": "2024-06-01T00:00:00+00:00",
        "digest_sha256": "ab" * 32,
        "revoked": False,
        "notes_url": "https://n",
    }
    assert dataclasses.replace(offer(m), candidate=None).to_json()["candidate"] is None
