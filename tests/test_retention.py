"""Retention: the pure plan (examples + hypothesis invariants) and the crash-safe deletion."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from watchdog_updater import retention
from watchdog_updater.errors import InstallError
from watchdog_updater.extract import clean_staging
from watchdog_updater.layout import Layout
from watchdog_updater.links import installed_versions, swap_link
from watchdog_updater.retention import collect_garbage, plan_gc


def numeric(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def test_keeps_the_newest(tmp_path: Path) -> None:
    installed = ["1.9", "1.10", "1.2", "1.11", "1.1"]
    assert plan_gc(installed, keep=3, protected=set(), order_key=numeric) == ["1.1", "1.2"]


def test_protected_versions_survive_however_old() -> None:
    installed = ["1", "2", "3", "4", "5"]
    # rolled back to 1: current=1, previous=5
    assert plan_gc(installed, keep=3, protected={"1", "5"}, order_key=int) == ["2"]


def test_protected_versions_do_not_take_a_slot() -> None:
    assert plan_gc(["1", "2", "3"], keep=1, protected={"1"}, order_key=int) == ["2"]


def test_nothing_to_delete_below_keep() -> None:
    assert plan_gc(["1", "2"], keep=3, protected=set(), order_key=int) == []


def test_keep_zero_deletes_everything_unprotected() -> None:
    assert plan_gc(["1", "2", "3"], keep=0, protected={"2"}, order_key=int) == ["1", "3"]


def test_ties_are_broken_by_name() -> None:
    assert plan_gc(["b", "a", "c"], keep=1, protected=set(), order_key=lambda v: 0) == ["a", "b"]


def test_negative_keep_is_refused() -> None:
    with pytest.raises(ValueError, match="keep"):
        plan_gc(["1"], keep=-1, protected=set(), order_key=int)


versions = st.text(alphabet="abcdef", min_size=1, max_size=3)


@settings(max_examples=200, deadline=None)
@given(
    installed=st.lists(versions, max_size=12),
    keep=st.integers(min_value=0, max_value=6),
    protected=st.sets(versions, max_size=4),
    quarantined=st.sets(versions, max_size=4),
    ranks=st.dictionaries(versions, st.integers(min_value=0, max_value=5)),
)
def test_plan_gc_invariants(
    installed: list[str],
    keep: int,
    protected: set[str],
    quarantined: set[str],
    ranks: dict[str, int],
) -> None:
    def key(v: str) -> int:
        return ranks.get(v, 0)  # many ties on purpose

    doomed = plan_gc(
        installed, keep=keep, protected=protected, order_key=key, quarantined=quarantined
    )
    distinct = set(installed)
    kept = distinct - set(doomed)
    # 1. only installed versions, each once, oldest first
    assert set(doomed) <= distinct and len(doomed) == len(set(doomed))
    assert doomed == sorted(doomed, key=lambda v: (key(v), v))
    # 2. never a protected version
    assert not set(doomed) & protected
    # 3. the newest `keep` good (not quarantined) versions are never deleted
    good = distinct - quarantined
    newest = sorted(good, key=lambda v: (key(v), v), reverse=True)[:keep]
    assert set(newest) <= kept
    # 4. complete: what survives is exactly those plus the protected ones
    assert kept == set(newest) | (distinct & protected)
    # 5. so at most `keep` unprotected versions remain, none quarantined, and every deleted good
    #    one is older than every kept unprotected one
    assert len(kept - protected) <= keep
    assert not (kept - protected) & quarantined
    for gone in set(doomed) - quarantined:
        assert all((key(gone), gone) < (key(k), k) for k in kept - protected)


def test_quarantined_versions_take_no_slot() -> None:
    installed = ["1", "2", "3", "4"]
    # keep=2: the quarantined 4 goes first, and 2 (a good rollback target) stays.
    assert plan_gc(installed, keep=2, protected=set(), order_key=int, quarantined={"4"}) == [
        "1",
        "4",
    ]


# ------------------------------------------------------------------------------------------------
# collect_garbage on disk


def installed_layout(tmp_path: Path, *versions: str) -> tuple[Layout, Path]:
    layout = Layout(root=tmp_path / "root")
    layout.lib_dir.mkdir(parents=True)
    cache = layout.cache_dir
    cache.mkdir(parents=True)
    for v in versions:
        (layout.version_dir(v) / "lib").mkdir(parents=True)
        (layout.version_dir(v) / "lib" / "x.py").write_text(v)
        (cache / v).mkdir()
        (cache / v / "release.tar.gz").write_bytes(b"x")
    return layout, cache


def test_collect_garbage_deletes_dirs_and_cache_entries(tmp_path: Path) -> None:
    layout, cache = installed_layout(tmp_path, "1", "2", "3", "4", "5")
    (cache / "other-state.json").write_text("{}")
    swap_link(layout, layout.current_link, "5")
    swap_link(layout, layout.previous_link, "4")
    removed = collect_garbage(layout, keep=2, protected=set(), order_key=int, cache_dir=cache)
    assert removed == ["1", "2", "3"]
    assert installed_versions(layout) == ["4", "5"]
    assert sorted(os.listdir(cache)) == ["4", "5", "other-state.json"]
    assert sorted(os.listdir(layout.versions_dir)) == ["hal0", "hal0-4", "hal0-5"]  # no trash


def test_collect_garbage_protects_current_and_previous_even_if_forgotten(tmp_path: Path) -> None:
    layout, cache = installed_layout(tmp_path, "1", "2", "3")
    swap_link(layout, layout.current_link, "1")  # rolled back to the oldest
    swap_link(layout, layout.previous_link, "2")
    removed = collect_garbage(layout, keep=0, protected=set(), order_key=int, cache_dir=cache)
    assert removed == ["3"]
    assert installed_versions(layout) == ["1", "2"]


def test_collect_garbage_protects_a_transaction_target(tmp_path: Path) -> None:
    layout, _ = installed_layout(tmp_path, "1", "2", "3")
    swap_link(layout, layout.current_link, "3")
    assert collect_garbage(layout, keep=1, protected={"1"}, order_key=int) == ["2"]
    assert installed_versions(layout) == ["1", "3"]


def test_collect_garbage_deletes_nothing_when_current_is_broken(tmp_path: Path) -> None:
    layout, cache = installed_layout(tmp_path, "1", "2", "3")
    os.symlink("../hal0-9", layout.current_link)
    with pytest.raises(InstallError, match="dangling"):
        collect_garbage(layout, keep=0, protected=set(), order_key=int, cache_dir=cache)
    assert installed_versions(layout) == ["1", "2", "3"]


def test_crash_mid_delete_leaves_only_a_trash_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout, _ = installed_layout(tmp_path, "1", "2")
    swap_link(layout, layout.current_link, "2")

    def dies_half_way(path: Path) -> None:
        (path / "lib" / "x.py").unlink()  # part of the tree is gone ...
        raise OSError(5, "Input/output error")  # ... then the process "dies"

    monkeypatch.setattr(retention, "remove_tree", dies_half_way)
    with pytest.raises(InstallError, match=r"cannot remove .*\.hal0-trash-hal0-1-"):
        collect_garbage(layout, keep=1, protected=set(), order_key=int)
    assert not layout.version_dir("1").exists()  # never half a version under its real name
    assert installed_versions(layout) == ["2"]
    leftovers = clean_staging(layout)
    assert [p.name.startswith(".hal0-trash-hal0-1-") for p in leftovers] == [True]
    assert sorted(os.listdir(layout.versions_dir)) == ["hal0", "hal0-2"]
