"""Atomic link operations: swap, promotion, reading links back, refusing what is not ours."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from watchdog_updater import links
from watchdog_updater.errors import InstallError
from watchdog_updater.layout import Layout
from watchdog_updater.links import (
    clean_temp_links,
    installed_versions,
    promote_staging,
    read_link_version,
    swap_link,
)


def make_layout(root: Path, *versions: str, style: str = "seed") -> Layout:
    layout = Layout(root=root, style=style)  # type: ignore[arg-type]
    layout.lib_dir.mkdir(parents=True, exist_ok=True)
    for v in versions:
        layout.version_dir(v).mkdir(parents=True)
        (layout.version_dir(v) / "VERSION").write_text(v)
    return layout


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return make_layout(tmp_path / "root", "1.0", "2.0")


@pytest.fixture
def fast_root(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs root when we may mount one: a thousand dir fsyncs on a real disk take seconds.

    rename(2) atomicity is a property of the VFS, the same on every filesystem.
    """
    root = tmp_path / "fast"
    root.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(root)], capture_output=True
        ).returncode
        == 0
    )
    yield root
    if mounted:
        subprocess.run(["umount", "-l", str(root)], check=False)


def test_swap_link_writes_a_relative_target(layout: Layout) -> None:
    swap_link(layout, layout.current_link, "1.0")
    assert os.readlink(layout.current_link) == "../hal0-1.0"
    assert (layout.current_link / "VERSION").read_text() == "1.0"
    assert read_link_version(layout, layout.current_link) == "1.0"


def test_swap_link_hal0_style(tmp_path: Path) -> None:
    layout = make_layout(tmp_path, "3.1", style="hal0")
    swap_link(layout, layout.current_link, "3.1")
    assert os.readlink(layout.current_link) == "hal0-3.1"
    assert read_link_version(layout, layout.current_link) == "3.1"


def test_swap_link_replaces_the_target_and_leaves_no_temp_names(layout: Layout) -> None:
    swap_link(layout, layout.current_link, "1.0")
    swap_link(layout, layout.previous_link, "1.0")
    swap_link(layout, layout.current_link, "2.0")
    assert read_link_version(layout, layout.current_link) == "2.0"
    assert read_link_version(layout, layout.previous_link) == "1.0"
    assert sorted(os.listdir(layout.lib_dir)) == ["current", "previous"]


def test_swap_is_atomic_for_concurrent_readers(fast_root: Path) -> None:
    layout = make_layout(fast_root, "1.0", "2.0")
    swap_link(layout, layout.current_link, "1.0")
    done = threading.Event()
    seen: set[str] = set()
    missing = 0
    reads = 0

    def reader() -> None:
        nonlocal missing, reads
        while not done.is_set():
            try:
                seen.add(os.readlink(layout.current_link))
            except FileNotFoundError:
                missing += 1
            reads += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1000):
            swap_link(layout, layout.current_link, "2.0" if i % 2 == 0 else "1.0")
    finally:
        done.set()
        thread.join()
    assert missing == 0
    assert seen == {"../hal0-1.0", "../hal0-2.0"}
    assert reads > 1000


def test_read_link_version_missing_link_is_none(layout: Layout) -> None:
    assert read_link_version(layout, layout.current_link) is None


def test_absolute_target_is_read_under_the_root(layout: Layout) -> None:
    os.symlink("/usr/lib/hal0-2.0", layout.current_link)  # as another tool might write it
    assert read_link_version(layout, layout.current_link) == "2.0"


def test_absolute_target_missing_under_the_root_is_dangling(layout: Layout) -> None:
    os.symlink("/usr/lib/hal0-7.0", layout.current_link)
    with pytest.raises(InstallError, match="dangling"):
        read_link_version(layout, layout.current_link)


def test_dangling_link_is_refused(layout: Layout) -> None:
    os.symlink("../hal0-9.9", layout.current_link)
    with pytest.raises(InstallError, match="dangling"):
        read_link_version(layout, layout.current_link)


def test_link_to_a_foreign_dir_is_refused(layout: Layout) -> None:
    (layout.root / "etc").mkdir()
    os.symlink("../../../etc", layout.current_link)
    with pytest.raises(InstallError, match="not a version dir"):
        read_link_version(layout, layout.current_link)


def test_link_to_a_file_named_like_a_version_is_refused(layout: Layout) -> None:
    layout.version_dir("3.0").write_text("not a dir")
    os.symlink("../hal0-3.0", layout.current_link)
    with pytest.raises(InstallError, match="not a directory"):
        read_link_version(layout, layout.current_link)


def test_current_as_a_real_directory_is_refused_never_deleted(layout: Layout) -> None:
    layout.current_link.mkdir()
    (layout.current_link / "precious").write_text("hand-made")
    with pytest.raises(InstallError, match="real directory"):
        read_link_version(layout, layout.current_link)
    with pytest.raises(InstallError, match="real directory"):
        swap_link(layout, layout.current_link, "2.0")
    assert (layout.current_link / "precious").read_text() == "hand-made"
    assert sorted(os.listdir(layout.lib_dir)) == ["current"]  # no temp link left behind


def test_current_as_a_regular_file_is_refused(layout: Layout) -> None:
    layout.current_link.write_text("x")
    with pytest.raises(InstallError, match="not a symlink"):
        swap_link(layout, layout.current_link, "2.0")
    assert layout.current_link.read_text() == "x"


def test_swap_to_a_missing_version_is_refused(layout: Layout) -> None:
    swap_link(layout, layout.current_link, "1.0")
    with pytest.raises(InstallError, match="no such version dir"):
        swap_link(layout, layout.current_link, "9.9")
    assert read_link_version(layout, layout.current_link) == "1.0"


def new_staging(layout: Layout, name: str, content: str) -> Path:
    staging = layout.staging_dir(name)
    (staging / "sub").mkdir(parents=True)
    (staging / "VERSION").write_text(content)
    return staging


def test_promote_staging(layout: Layout) -> None:
    staging = new_staging(layout, "tx", "3.0")
    promote_staging(staging, layout.version_dir("3.0"))
    assert not staging.exists()
    assert (layout.version_dir("3.0") / "VERSION").read_text() == "3.0"


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_promote_over_a_retained_version(
    layout: Layout, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:
        monkeypatch.setattr(links, "_exchange", lambda a, b: False)
    (layout.version_dir("2.0") / "old-only").write_text("x")
    staging = new_staging(layout, "tx", "2.0 again")
    promote_staging(staging, layout.version_dir("2.0"))
    assert (layout.version_dir("2.0") / "VERSION").read_text() == "2.0 again"
    assert not (layout.version_dir("2.0") / "old-only").exists()
    assert sorted(os.listdir(layout.versions_dir)) == ["hal0", "hal0-1.0", "hal0-2.0"]


def test_reinstalling_a_version_never_leaves_its_name_missing(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Re-installing the version `current` points at: between any two steps, the name must
    # exist (with two plain renames there is a moment when `current` dangles).
    swap_link(layout, layout.current_link, "2.0")
    gaps: list[tuple[str, str]] = []
    real_rename = os.rename

    def watching_rename(src: str, dst: str) -> None:
        real_rename(src, dst)
        if not (layout.current_link / "VERSION").exists():
            gaps.append((str(src), str(dst)))

    monkeypatch.setattr(os, "rename", watching_rename)
    promote_staging(new_staging(layout, "tx", "2.0 again"), layout.version_dir("2.0"))
    assert gaps == []
    assert (layout.current_link / "VERSION").read_text() == "2.0 again"


def test_promote_of_a_missing_staging_dir_is_an_install_error(layout: Layout) -> None:
    with pytest.raises(InstallError, match="cannot move"):
        promote_staging(layout.staging_dir("nope"), layout.version_dir("3.0"))


def test_installed_versions_lists_only_version_dirs(layout: Layout) -> None:
    vd = layout.versions_dir
    (vd / ".hal0-staging-tx").mkdir()
    (vd / ".hal0-trash-hal0-0.1-abc").mkdir()
    (vd / "hal0-file").write_text("not a dir")
    (vd / "hal0-link").symlink_to("hal0-1.0")
    (vd / "hal0-").mkdir()
    (vd / "other").mkdir()
    assert installed_versions(layout) == ["1.0", "2.0"]


def test_installed_versions_without_a_versions_dir(tmp_path: Path) -> None:
    assert installed_versions(Layout(root=tmp_path / "nothing")) == []


def test_clean_temp_links(layout: Layout) -> None:
    swap_link(layout, layout.current_link, "1.0")
    crash_leftover = layout.lib_dir / f"{links.TEMP_LINK_PREFIX}current-abc"
    crash_leftover.symlink_to("../hal0-2.0")
    assert clean_temp_links(layout) == [crash_leftover]
    assert sorted(os.listdir(layout.lib_dir)) == ["current"]


def test_move_to_trash(layout: Layout) -> None:
    trash = links.move_to_trash(layout.version_dir("1.0"))
    assert trash.name.startswith(".hal0-trash-hal0-1.0-")
    assert (trash / "VERSION").read_text() == "1.0"
    assert installed_versions(layout) == ["2.0"]


def test_swap_link_creates_a_missing_lib_dir(tmp_path: Path) -> None:
    layout = Layout(root=tmp_path)
    layout.version_dir("1.0").mkdir(parents=True)
    swap_link(layout, layout.current_link, "1.0")
    assert read_link_version(layout, layout.current_link) == "1.0"
