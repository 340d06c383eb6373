"""When the daemon updates: pure planning on top of APScheduler 3.x's cron arithmetic.

Nothing here reads a clock, sleeps or touches a file: every function takes the current moment as an
argument, so tests drive days of schedule in microseconds and the daemon stays a thin loop around it.

Rules:

- ``cron`` is a 5-field crontab in *local* time (``after.tzinfo``), computed by APScheduler's
  ``CronTrigger.from_crontab(...).get_next_fire_time(None, after)``, with crontab's meaning kept where
  APScheduler 3.x differs: day-of-week 0 and 7 are Sunday (APScheduler 3.x reads 0 as Monday), and
  when both day-of-month and day-of-week are restricted a day matching either fires (Vixie cron).
- DST: a slot whose wall time a spring-forward skips fires as if the clock had not jumped (02:30
  becomes 03:30, once); a fixed-hour slot in the hour repeated by a fall-back fires once, at its
  first occurrence (wildcard-hour schedules keep both occurrences, as in Vixie cron). All arithmetic on
  instants is done in UTC: aware datetimes sharing a tzinfo compare as wall times in Python.
- The run starts at the slot plus a uniform jitter in ``[0, jitter_s]``. With a maintenance window
  (``("HH:MM", "HH:MM")``, end exclusive, may wrap midnight; start == end means all day) a slot
  outside the window moves to the next window opening, and the jitter is drawn so that the run still
  *starts* inside the window (never more than the window has left). A run already started may end
  after the window closes (a gate in progress finishes).
- :class:`Misfire`: a run found due more than ``grace_s`` late (the host slept, was off, or the
  daemon was stopped) is a misfire. All the slots missed meanwhile are coalesced into ONE catch-up
  run, placed like a fresh slot at "now" (jitter, window); if the next regular run comes before the
  catch-up's window closes anyway (no window: within ``max(jitter_s, grace_s)`` of it), the catch-up
  is merged into it. A run late by at most ``grace_s`` runs as planned, but never outside the window.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any

__all__ = [
    "DEFAULT_MISFIRE_GRACE_S",
    "Misfire",
    "Planned",
    "Schedule",
    "count_fires",
    "in_window",
    "local_zone",
    "next_fire",
    "next_update_at",
    "next_window_opening",
    "plan",
    "validate_cron",
    "window_close",
]

Window = tuple[str, str] | None

DEFAULT_MISFIRE_GRACE_S = 900.0
_MICROSECOND = timedelta(microseconds=1)
_MAX_SKIPS = 64  # DST duplicates skipped in a row (one per fall-back hour at most, in practice)
_MAX_COUNT = 100_000  # missed slots counted at most (a "* * * * *" host off for months)
_DOW_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # crontab numbering: 0 = Sunday


def local_zone() -> tzinfo:
    """The host's zone (``/etc/localtime``, or ``$TZ``), as a zoneinfo object; UTC if unknown.

    Reads the environment (through tzlocal): only the CLI calls this, and passes the zone on.
    """
    try:
        from tzlocal import get_localzone

        return get_localzone()
    except Exception:  # tzlocal raises a variety of errors for broken setups
        return UTC


# --------------------------------------------------------------------------- instants


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"expected an aware datetime, got {moment!r}")
    return moment.astimezone(UTC)


def _zone(moment: datetime) -> tzinfo:
    _utc(moment)
    assert moment.tzinfo is not None
    return moment.tzinfo


def _normal(moment: datetime, tz: tzinfo) -> datetime:
    """The same instant as a valid wall time in ``tz`` (skipped times move forward, fold is set)."""
    return _utc(moment).astimezone(tz)


def _add(moment: datetime, seconds: float) -> datetime:
    """``moment`` plus elapsed seconds (not wall-clock seconds: a DST change in between counts)."""
    return _normal(_utc(moment) + timedelta(seconds=seconds), _zone(moment))


def _seconds(start: datetime, end: datetime) -> float:
    return (_utc(end) - _utc(start)).total_seconds()


def _wall(day: date, at: time, tz: tzinfo) -> datetime:
    """The first instant whose wall time in ``tz`` is ``day at`` (a skipped time moves forward)."""
    return _normal(datetime.combine(day, at, tzinfo=tz), tz)


# --------------------------------------------------------------------------- cron


def _weekday(token: str) -> int:
    if token.isdigit():
        value = int(token)
        if 0 <= value <= 7:
            return value
    elif token in _DOW_NAMES:
        return _DOW_NAMES.index(token)
    raise ValueError(f"invalid day of week {token!r} (0-7 or sun-sat)")


def _crontab_weekdays(field: str) -> str:
    """crontab's day-of-week field as APScheduler weekday names (0 and 7 are Sunday in crontab)."""
    if field == "*":
        return "*"
    days: set[int] = set()
    for part in field.lower().split(","):
        span, slash, step_text = part.partition("/")
        if slash and not (step_text.isdigit() and int(step_text) > 0):
            raise ValueError(f"invalid step in day of week {part!r}")
        step = int(step_text) if slash else 1
        if span == "*":
            low, high = 0, 6
        else:
            first, dash, last = span.partition("-")
            low = _weekday(first)
            high = _weekday(last) if dash else (7 if slash else low)
            if high < low:
                raise ValueError(f"day-of-week range {span!r} runs backwards")
        days.update(day % 7 for day in range(low, high + 1, step))
    if len(days) == 7:
        return "*"
    return ",".join(_DOW_NAMES[day] for day in sorted(days))


@functools.lru_cache(maxsize=32)
def _compile(cron: str, tz: tzinfo) -> tuple[tuple[Any, ...], bool]:
    """APScheduler triggers whose earliest fire is the crontab's, and whether the hour is fixed."""
    from apscheduler.triggers.cron import CronTrigger

    fields = cron.split()
    if len(fields) != 5:
        raise ValueError(f"expected 5 cron fields (minute hour day month weekday), got {cron!r}")
    minute, hour, day, month, weekday = fields
    weekday = _crontab_weekdays(weekday)
    variants = [(day, weekday)]
    if not day.startswith("*") and not weekday.startswith("*"):
        variants = [(day, "*"), ("*", weekday)]  # Vixie cron: either field may match
    triggers = tuple(
        CronTrigger(minute=minute, hour=hour, day=d, month=month, day_of_week=w, timezone=tz)
        for d, w in variants
    )
    return triggers, not hour.startswith("*")


def validate_cron(cron: str) -> None:
    """Raise ValueError if ``cron`` is not a crontab expression that ever fires."""
    next_fire(cron, datetime(2000, 1, 1, tzinfo=UTC))


def next_fire(cron: str, after: datetime) -> datetime:
    """The first cron slot at or after ``after`` (aware), in ``after``'s zone."""
    tz = _zone(after)
    triggers, fixed_hour = _compile(cron, tz)
    start = _normal(after, tz)
    for _ in range(_MAX_SKIPS):
        fires = [t.get_next_fire_time(None, start) for t in triggers]
        candidates = [_normal(f, tz) for f in fires if f is not None]
        if not candidates:
            raise ValueError(f"cron {cron!r} never fires after {after.isoformat()}")
        fire = min(candidates, key=_utc)
        if _utc(fire) < _utc(after) or (fixed_hour and fire.fold == 1):
            # Before ``after`` (a skipped wall time mapped back), or the repeat of a fixed-hour
            # slot in a fall-back hour: its first occurrence already had (or will have) the run.
            start = _add(fire, 1e-6)
            continue
        return fire
    raise ValueError(f"cron {cron!r}: no usable slot after {after.isoformat()}")


def _fires_between(
    cron: str, start: datetime, end: datetime, limit: int
) -> tuple[int, datetime | None]:
    count, cursor, last = 0, start, None
    while count < limit:
        fire = next_fire(cron, cursor)
        if _utc(fire) > _utc(end):
            break
        count, last = count + 1, fire
        cursor = _add(fire, 1e-6)
    return count, last


def count_fires(cron: str, start: datetime, end: datetime, *, limit: int = _MAX_COUNT) -> int:
    """How many slots fall in ``[start, end]`` (at most ``limit``)."""
    return _fires_between(cron, start, end, limit)[0]


# --------------------------------------------------------------------------- window


@functools.lru_cache(maxsize=32)
def _bounds(window: tuple[str, str]) -> tuple[time, time]:
    def parse(text: str) -> time:
        hours, sep, minutes = text.partition(":")
        if not (sep and hours.isdigit() and minutes.isdigit()):
            raise ValueError(f"window time must be HH:MM, got {text!r}")
        return time(int(hours), int(minutes))

    if len(window) != 2:
        raise ValueError(f"a window is (start, end), got {window!r}")
    return parse(window[0]), parse(window[1])


def _all_day(window: Window) -> bool:
    if window is None:
        return True
    start, end = _bounds(window)
    return start == end


def in_window(window: Window, at: datetime) -> bool:
    """Whether the wall time of ``at`` (in its own zone) lies in ``window`` (end exclusive)."""
    if window is None:
        return True
    start, end = _bounds(window)
    wall = _normal(at, _zone(at)).time().replace(fold=0)
    if start == end:
        return True
    if start < end:
        return start <= wall < end
    return wall >= start or wall < end  # wraps midnight


def next_window_opening(window: tuple[str, str], after: datetime) -> datetime:
    """The first window opening strictly after ``after``, in ``after``'s zone."""
    tz = _zone(after)
    start, _ = _bounds(window)
    local = _normal(after, tz)
    for days in range(0, 9):
        opening = _wall(local.date() + timedelta(days=days), start, tz)
        if _utc(opening) > _utc(after) and in_window(window, opening):
            return opening
    raise ValueError(f"window {window!r} never opens")  # only if DST swallowed it for a week


def window_close(window: Window, at: datetime) -> datetime | None:
    """When the window occurrence containing ``at`` closes (``None``: no window or all day)."""
    if window is None or _all_day(window):
        return None
    if not in_window(window, at):
        raise ValueError(f"{at.isoformat()} is outside the window {window!r}")
    tz = _zone(at)
    _, end = _bounds(window)
    local = _normal(at, tz)
    for days in range(0, 3):
        close = _wall(local.date() + timedelta(days=days), end, tz)
        if _utc(close) > _utc(at):
            return close
    raise AssertionError("unreachable: a window closes within two days")


def _draw(rng: random.Random, limit_s: float) -> float:
    """Uniform in ``[0, limit_s)``, whole microseconds (so the bound survives datetime rounding)."""
    if limit_s <= 0:
        return 0.0
    return int(rng.random() * limit_s * 1_000_000) / 1_000_000


def _place(start: datetime, jitter_s: float, window: Window, rng: random.Random) -> datetime:
    """The run for a slot at ``start``: jitter added, inside the window."""
    opened = window is None or in_window(window, start)
    base = start if opened or window is None else next_window_opening(window, start)
    close = window_close(window, base)
    limit = jitter_s if close is None else min(jitter_s, _seconds(base, close))
    return _add(base, _draw(rng, limit))


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Planned:
    """One scheduled run: the cron ``slot`` it belongs to and when it starts (``at``).

    ``missed`` counts the slots coalesced into this run after a misfire (0: on schedule).
    """

    slot: datetime
    at: datetime
    missed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "slot": _utc(self.slot).timestamp(),
            "at": _utc(self.at).timestamp(),
            "missed": self.missed,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], tz: tzinfo) -> Planned:
        def moment(value: object) -> datetime:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"expected a timestamp, got {value!r}")
            return datetime.fromtimestamp(float(value), tz)

        missed = doc.get("missed", 0)
        if isinstance(missed, bool) or not isinstance(missed, int) or missed < 0:
            raise TypeError(f"missed must be a count, got {missed!r}")
        return cls(slot=moment(doc["slot"]), at=moment(doc["at"]), missed=missed)


def plan(
    cron: str, jitter_s: float, window: Window, after: datetime, rng: random.Random
) -> Planned:
    """The next run: the first cron slot at or after ``after``, plus jitter, inside the window."""
    slot = next_fire(cron, after)
    return Planned(slot=slot, at=_place(slot, jitter_s, window, rng))


def next_update_at(
    cron: str,
    jitter_s: float,
    window: tuple[str, str] | None,
    after: datetime,
    rng: random.Random,
) -> datetime:
    """When the next scheduled update starts (see :func:`plan`)."""
    return plan(cron, jitter_s, window, after, rng).at


@dataclass(frozen=True)
class Misfire:
    """What to do with a run found due late: on time within ``grace_s``, else one catch-up run."""

    grace_s: float = DEFAULT_MISFIRE_GRACE_S

    def resolve(
        self,
        planned: Planned,
        now: datetime,
        *,
        cron: str,
        jitter_s: float,
        window: Window,
        rng: random.Random,
    ) -> Planned:
        """The run to do for ``planned`` (due: ``planned.at <= now``).

        The result's ``at <= now`` means "run now"; a later ``at`` means "wait until then".
        """
        late = _seconds(planned.at, now)
        if late <= self.grace_s and in_window(window, now):
            return planned
        newest = planned.slot
        if late <= self.grace_s:
            missed = planned.missed  # the window closed during the grace: no slot was missed
        else:
            count, last = _fires_between(cron, planned.slot, now, _MAX_COUNT)
            missed, newest = max(planned.missed, count), last or planned.slot
        catch_up = _place(now, jitter_s, window, rng)
        regular = plan(cron, jitter_s, window, _add(now, 1e-6), rng)
        close = window_close(window, catch_up)
        horizon = close if close is not None else _add(catch_up, max(jitter_s, self.grace_s))
        if _utc(regular.at) <= _utc(horizon):
            # The next regular run comes soon anyway (same window): it is the coalesced run.
            return replace(regular, missed=max(missed, 1))
        return Planned(slot=newest, at=catch_up, missed=max(missed, 1))


class Schedule:
    """The update schedule as a pure state machine: the daemon feeds it "now" and runs what it says.

    ``start(now, saved)`` plans from ``now`` (or resumes a plan persisted before a restart);
    ``poll(now)`` then returns None, or the run to start now - and plans the next one at once, so
    each slot runs at most once even if the run never finishes.
    """

    def __init__(
        self,
        cron: str,
        jitter_s: float,
        window: Window,
        *,
        rng: random.Random,
        misfire: Misfire | None = None,
    ) -> None:
        validate_cron(cron)
        if window is not None:
            _bounds(window)
        if jitter_s < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter_s!r}")
        self.cron = cron
        self.jitter_s = jitter_s
        self.window = window
        self.rng = rng
        self.misfire = misfire or Misfire()
        self._planned: Planned | None = None

    @property
    def planned(self) -> Planned:
        if self._planned is None:
            raise RuntimeError("Schedule.start() first")
        return self._planned

    def start(self, now: datetime, saved: Planned | None = None) -> Planned:
        """Plan from ``now``, or resume ``saved`` (a plan persisted by an earlier process)."""
        self._planned = saved if saved is not None else self._plan_after(now)
        return self._planned

    def _plan_after(self, after: datetime) -> Planned:
        return plan(self.cron, self.jitter_s, self.window, after, self.rng)

    def poll(self, now: datetime) -> Planned | None:
        """The run to start now, if one is due (the next one is planned at once); else None."""
        planned = self.planned
        if _utc(now) < _utc(planned.at):
            return None
        run = self.misfire.resolve(
            planned, now, cron=self.cron, jitter_s=self.jitter_s, window=self.window, rng=self.rng
        )
        if _utc(run.at) > _utc(now):
            self._planned = run  # deferred (window) or a catch-up with jitter: wait for it
            return None
        after = max(_utc(now), _utc(run.slot)) + _MICROSECOND
        self._planned = self._plan_after(after.astimezone(_zone(now)))
        return run

    def replan(self, now: datetime) -> Planned:
        """Forget the current plan and plan from ``now`` (after a settings change)."""
        self._planned = self._plan_after(now)
        return self._planned
