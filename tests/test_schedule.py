"""The pure update planner (watchdog_updater/schedule.py) under a fast clock: days of schedule are
simulated by feeding "now" to the planner, nothing sleeps."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from watchdog_updater.schedule import (
    Misfire,
    Planned,
    Schedule,
    count_fires,
    in_window,
    next_fire,
    next_update_at,
    next_window_opening,
    plan,
    validate_cron,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
MINUTE = timedelta(minutes=1)


def at(*args: int, tz: ZoneInfo = BERLIN) -> datetime:
    return datetime(*args, tzinfo=tz)  # type: ignore[misc]


def elapsed(start: datetime, end: datetime) -> float:
    """Real seconds between two instants (aware datetimes of one zone subtract as wall times)."""
    return (end.astimezone(UTC) - start.astimezone(UTC)).total_seconds()


def wall(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M %Z")


# --------------------------------------------------------------------------- cron and jitter


def test_nightly_cron_fires_at_three_local_plus_jitter() -> None:
    after = at(2024, 6, 1, 12, 0)
    for seed in range(200):
        planned = plan("0 3 * * *", 1800, None, after, random.Random(seed))
        assert planned.slot == at(2024, 6, 2, 3, 0)
        assert 0 <= elapsed(planned.slot, planned.at) <= 1800
    spread = {
        round(elapsed(at(2024, 6, 2, 3, 0), next_update_at("0 3 * * *", 1800, None, after, rng)))
        for rng in (random.Random(s) for s in range(50))
    }
    assert len(spread) > 40  # really random, not one fixed offset


def test_no_jitter_runs_on_the_slot_and_a_slot_equal_to_after_counts() -> None:
    rng = random.Random(0)
    assert next_update_at("0 3 * * *", 0, None, at(2024, 6, 1, 12, 0), rng) == at(2024, 6, 2, 3, 0)
    assert next_update_at("0 3 * * *", 0, None, at(2024, 6, 2, 3, 0), rng) == at(2024, 6, 2, 3, 0)
    assert next_fire("0 3 * * *", at(2024, 6, 2, 3, 0, 1)) == at(2024, 6, 3, 3, 0)


def test_day_of_week_has_crontab_meaning() -> None:
    saturday = at(2024, 6, 1, 12, 0)
    # 0 and 7 are Sunday in crontab (APScheduler 3.x alone would read 0 as Monday).
    assert next_fire("0 3 * * 0", saturday) == at(2024, 6, 2, 3, 0)
    assert next_fire("0 3 * * 7", saturday) == at(2024, 6, 2, 3, 0)
    assert next_fire("0 3 * * sun", saturday) == at(2024, 6, 2, 3, 0)
    assert next_fire("0 3 * * 1-5", saturday) == at(2024, 6, 3, 3, 0)  # Monday
    assert next_fire("0 3 * * 5-7", at(2024, 6, 3, 12, 0)) == at(2024, 6, 7, 3, 0)  # Friday
    # Day of month and day of week both restricted: either matches (Vixie cron).
    assert next_fire("0 3 15 * 1", saturday) == at(2024, 6, 3, 3, 0)  # a Monday before the 15th
    assert next_fire("0 3 15 * 1", at(2024, 6, 11, 12, 0)) == at(2024, 6, 15, 3, 0)


@pytest.mark.parametrize("cron", ["0 3 * *", "61 3 * * *", "0 3 * * 8", "0 3 * * fri-mon", "x"])
def test_invalid_cron_is_refused(cron: str) -> None:
    with pytest.raises(ValueError):
        validate_cron(cron)


# --------------------------------------------------------------------------- window


def test_in_window_plain_and_wrapping() -> None:
    day = (2024, 6, 1)
    assert in_window(("02:00", "05:00"), at(*day, 2, 0))
    assert in_window(("02:00", "05:00"), at(*day, 4, 59))
    assert not in_window(("02:00", "05:00"), at(*day, 5, 0))  # the end is exclusive
    assert not in_window(("02:00", "05:00"), at(*day, 1, 59))
    assert in_window(("22:00", "02:00"), at(*day, 23, 30))
    assert in_window(("22:00", "02:00"), at(*day, 1, 30))
    assert not in_window(("22:00", "02:00"), at(*day, 2, 0))
    assert not in_window(("22:00", "02:00"), at(*day, 12, 0))
    assert in_window(("03:00", "03:00"), at(*day, 12, 0))  # start == end: all day
    assert in_window(None, at(*day, 12, 0))


def test_run_never_starts_outside_the_window() -> None:
    window = ("02:00", "04:00")
    after = at(2024, 6, 1, 12, 0)
    for seed in range(300):
        # The slot (01:00) is before the window: the run moves to the opening, jitter kept inside.
        planned = plan("0 1 * * *", 3 * 3600, window, after, random.Random(seed))
        assert planned.slot == at(2024, 6, 2, 1, 0)
        assert in_window(window, planned.at), wall(planned.at)
        assert at(2024, 6, 2, 2, 0) <= planned.at < at(2024, 6, 2, 4, 0)
        # The slot is inside the window but the jitter is longer than what is left of it.
        planned = plan("30 3 * * *", 3 * 3600, window, after, random.Random(seed))
        assert at(2024, 6, 2, 3, 30) <= planned.at < at(2024, 6, 2, 4, 0), wall(planned.at)


def test_windows_that_wrap_midnight() -> None:
    window = ("22:00", "02:00")
    after = at(2024, 6, 1, 12, 0)
    for seed in range(200):
        rng = random.Random(seed)
        # 03:00 is outside: the run waits for 22:00 the same evening.
        late = plan("0 3 * * *", 1800, window, after, rng)
        assert late.slot == at(2024, 6, 2, 3, 0)
        assert at(2024, 6, 2, 22, 0) <= late.at <= at(2024, 6, 2, 22, 30)
        # 23:30 is inside, with 2.5 h of window left after it, across midnight.
        night = plan("30 23 * * *", 4 * 3600, window, after, rng)
        assert at(2024, 6, 1, 23, 30) <= night.at < at(2024, 6, 2, 2, 0)
        assert in_window(window, night.at)
        # 01:00 (after midnight) is inside too.
        early = plan("0 1 * * *", 3600, window, after, rng)
        assert at(2024, 6, 2, 1, 0) <= early.at < at(2024, 6, 2, 2, 0)
    assert next_window_opening(window, at(2024, 6, 1, 23, 0)) == at(2024, 6, 2, 22, 0)


# --------------------------------------------------------------------------- DST


def test_dst_spring_forward() -> None:
    # Europe/Berlin, 2024-03-31: 02:00 CET jumps to 03:00 CEST.
    before = at(2024, 3, 30, 12, 0)
    nightly = next_fire("0 3 * * *", before)
    assert wall(nightly) == "2024-03-31 03:00 CEST"
    assert nightly.astimezone(UTC) == datetime(2024, 3, 31, 1, 0, tzinfo=UTC)
    # 02:30 does not exist that night: the run happens once, when the clock has jumped over it.
    skipped = next_fire("30 2 * * *", before)
    assert wall(skipped) == "2024-03-31 03:30 CEST"
    assert next_fire("30 2 * * *", skipped + MINUTE) == at(2024, 4, 1, 2, 30)
    # Jitter is real time: from 01:59 CET, one hour of jitter ends at 03:59 CEST on the clock.
    for seed in range(100):
        planned = plan("59 1 * * *", 3600, None, before, random.Random(seed))
        assert 0 <= elapsed(planned.slot, planned.at) <= 3600
        assert planned.at <= at(2024, 3, 31, 3, 59)
    # A window 02:00-04:00 is one real hour long that night, and opens at 03:00 CEST.
    window = ("02:00", "04:00")
    for seed in range(100):
        planned = plan("0 1 * * *", 4 * 3600, window, before, random.Random(seed))
        assert at(2024, 3, 31, 3, 0) <= planned.at < at(2024, 3, 31, 4, 0), wall(planned.at)
        assert in_window(window, planned.at)


def test_dst_fall_back_runs_once() -> None:
    # Europe/Berlin, 2024-10-27: 03:00 CEST goes back to 02:00 CET; 02:xx happens twice.
    before = at(2024, 10, 26, 12, 0)
    start, end = at(2024, 10, 27, 0, 0), at(2024, 10, 28, 0, 0)
    first = next_fire("30 2 * * *", before)
    assert wall(first) == "2024-10-27 02:30 CEST"
    after_first = next_fire("30 2 * * *", first + timedelta(seconds=1))
    assert after_first.astimezone(UTC) == datetime(2024, 10, 28, 1, 30, tzinfo=UTC)
    assert count_fires("30 2 * * *", start, end) == 1
    assert count_fires("0 3 * * *", start, end) == 1
    # A schedule with a wildcard hour means "every half hour": both 02:30s run, as in cron.
    assert count_fires("30 * * * *", start, end) == 25
    # The nightly 03:00 stays 03:00 on the clock on both sides of the change.
    assert [wall(next_fire("0 3 * * *", at(2024, 10, d, 12, 0))) for d in (26, 27)] == [
        "2024-10-27 03:00 CET",
        "2024-10-28 03:00 CET",
    ]


def test_other_zones() -> None:
    # America/New_York springs forward on 2024-03-10 at 02:00.
    assert wall(next_fire("30 2 * * *", at(2024, 3, 9, 12, 0, tz=NEW_YORK))) == (
        "2024-03-10 03:30 EDT"
    )
    assert next_fire("0 3 * * *", datetime(2024, 6, 1, 12, 0, tzinfo=UTC)) == datetime(
        2024, 6, 2, 3, 0, tzinfo=UTC
    )
    with pytest.raises(ValueError):
        next_fire("0 3 * * *", datetime(2024, 6, 1, 12, 0))  # naive: which zone?


# --------------------------------------------------------------------------- misfires


def simulate(
    schedule: Schedule,
    start: datetime,
    end: datetime,
    *,
    asleep: tuple[datetime, datetime] | None = None,
    step: timedelta = MINUTE,
) -> list[Planned]:
    """Drive the schedule like the daemon's loop: poll every ``step``, except while asleep."""
    schedule.start(start)
    runs: list[Planned] = []
    for now in _ticks(start, end, step):
        if asleep and asleep[0] <= now < asleep[1]:
            continue
        run = schedule.poll(now)
        if run is not None:
            runs.append(run)
            assert in_window(schedule.window, now), f"ran outside the window at {wall(now)}"
    return runs


def _ticks(start: datetime, end: datetime, step: timedelta) -> Iterator[datetime]:
    utc = start.astimezone(UTC)
    while utc <= end.astimezone(UTC):
        yield utc.astimezone(start.tzinfo)
        utc += step


def test_host_off_three_days_gives_one_run_not_three() -> None:
    schedule = Schedule("0 3 * * *", 0, None, rng=random.Random(1))
    off, back = at(2024, 6, 1, 12, 0), at(2024, 6, 4, 12, 0)
    runs = simulate(schedule, at(2024, 6, 1, 11, 0), at(2024, 6, 5, 12, 0), asleep=(off, back))
    assert [wall(r.slot) for r in runs] == [
        "2024-06-04 03:00 CEST",  # the newest missed slot, caught up once on waking
        "2024-06-05 03:00 CEST",
    ]
    catch_up, regular = runs
    assert catch_up.missed == 3  # June 2, 3 and 4 coalesced
    assert catch_up.at == back  # no jitter configured, no window: right away
    assert regular.missed == 0 and regular.at == at(2024, 6, 5, 3, 0)


def test_catch_up_waits_for_the_window_and_merges_with_the_next_run() -> None:
    window = ("02:00", "05:00")
    schedule = Schedule("0 3 * * *", 1800, window, rng=random.Random(2))
    off, back = at(2024, 6, 1, 12, 0), at(2024, 6, 4, 12, 0)
    runs = simulate(schedule, at(2024, 6, 1, 11, 0), at(2024, 6, 6, 12, 0), asleep=(off, back))
    # Woken at noon, outside the window: the missed runs fold into the next night's run.
    assert [r.at.date().isoformat() for r in runs] == ["2024-06-05", "2024-06-06"]
    assert runs[0].missed == 3
    assert all(in_window(window, r.at) for r in runs)


def test_late_within_grace_runs_now_but_never_outside_the_window() -> None:
    misfire = Misfire(grace_s=900)
    rng = random.Random(3)
    planned = Planned(slot=at(2024, 6, 2, 4, 50), at=at(2024, 6, 2, 4, 58))

    def resolve(now: datetime, window: tuple[str, str] | None, jitter_s: float) -> Planned:
        return misfire.resolve(
            planned, now, cron="50 4 * * *", jitter_s=jitter_s, window=window, rng=rng
        )

    # Five minutes late, window still open: on schedule.
    assert resolve(at(2024, 6, 2, 4, 59), ("02:00", "05:00"), 600) == planned
    # Five minutes late, but the window closed at 05:00: the next window, one run.
    later = resolve(at(2024, 6, 2, 5, 3), ("02:00", "05:00"), 600)
    assert later.at > at(2024, 6, 2, 5, 3)
    assert at(2024, 6, 3, 2, 0) <= later.at < at(2024, 6, 3, 5, 0)
    # An hour late (suspended laptop), no window: a misfire, one catch-up run right away.
    caught = resolve(at(2024, 6, 2, 6, 0), None, 0)
    assert caught.at == at(2024, 6, 2, 6, 0) and caught.missed == 1


def test_schedule_runs_each_slot_once_even_when_polled_on_the_slot() -> None:
    schedule = Schedule("*/10 * * * *", 0, None, rng=random.Random(4))
    runs = simulate(schedule, at(2024, 6, 1, 0, 0), at(2024, 6, 1, 1, 0), step=timedelta(seconds=5))
    assert [r.at.strftime("%H:%M") for r in runs] == [
        "00:00",
        "00:10",
        "00:20",
        "00:30",
        "00:40",
        "00:50",
        "01:00",
    ]


def test_planned_round_trips_through_json() -> None:
    planned = Planned(slot=at(2024, 10, 27, 2, 30), at=at(2024, 10, 27, 2, 45), missed=2)
    back = Planned.from_json(planned.to_json(), BERLIN)
    assert back.to_json() == planned.to_json()
    assert elapsed(back.slot, back.at) == 15 * 60


# --------------------------------------------------------------------------- properties

ZONES = [UTC, BERLIN, NEW_YORK, ZoneInfo("Australia/Lord_Howe"), ZoneInfo("Asia/Kolkata")]
CRONS = ["0 3 * * *", "30 2 * * *", "*/15 * * * *", "0 */6 * * *", "45 1 * * 0", "0 0 1 * *"]
hhmm = st.builds(lambda h, m: f"{h:02d}:{m:02d}", st.integers(0, 23), st.sampled_from([0, 30, 45]))


@settings(max_examples=300, deadline=None)
@given(
    cron=st.sampled_from(CRONS),
    zone=st.sampled_from(ZONES),
    after_s=st.integers(int(datetime(2020, 1, 1, tzinfo=UTC).timestamp()), 1_900_000_000),
    jitter_s=st.sampled_from([0.0, 1.0, 600.0, 1800.0, 4 * 3600.0]),
    window=st.none() | st.tuples(hhmm, hhmm),
    seed=st.integers(0, 2**32 - 1),
)
def test_planned_time_property(
    cron: str,
    zone: ZoneInfo,
    after_s: int,
    jitter_s: float,
    window: tuple[str, str] | None,
    seed: int,
) -> None:
    after = datetime.fromtimestamp(after_s, zone)
    planned = plan(cron, jitter_s, window, after, random.Random(seed))
    assert planned.slot.astimezone(UTC) >= after.astimezone(UTC)
    assert planned.at.astimezone(UTC) >= planned.slot.astimezone(UTC)
    if window is not None:
        assert in_window(window, planned.at), (wall(planned.slot), wall(planned.at))
    # Within slot + jitter, plus the wait for the window to open when the slot is outside it.
    wait = 0.0
    if window is not None and not in_window(window, planned.slot):
        wait = elapsed(planned.slot, next_window_opening(window, planned.slot))
    assert elapsed(planned.slot, planned.at) <= jitter_s + wait + 1e-6


@settings(max_examples=100, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    start_s=st.integers(int(datetime(2022, 1, 1, tzinfo=UTC).timestamp()), 1_800_000_000),
    sleep_h=st.integers(0, 24 * 10),
    window=st.none() | st.tuples(hhmm, hhmm),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_long_sleep_gives_at_most_one_run_before_the_next_slot(
    zone: ZoneInfo, start_s: int, sleep_h: int, window: tuple[str, str] | None, seed: int
) -> None:
    schedule = Schedule("0 3 * * *", 1800, window, rng=random.Random(seed))
    start = datetime.fromtimestamp(start_s, zone)
    schedule.start(start)
    wake = start + timedelta(hours=sleep_h)
    runs = []
    for now in _ticks(wake, wake + timedelta(days=1), timedelta(minutes=5)):
        run = schedule.poll(now)
        if run is not None:
            runs.append(run)
            assert in_window(window, now)
        assert schedule.planned.at.astimezone(UTC) > now.astimezone(UTC)  # nothing left due
    # Whatever was missed, one day of polling never runs more than a catch-up plus one slot.
    assert len(runs) <= 2
