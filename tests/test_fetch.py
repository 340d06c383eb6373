"""One short test per attack or fault, against a real release server on loopback (HTTP and HTTPS)."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kit.release_server import ReleaseServer
from tests.kit.tls import TestCA
from watchdog_updater.errors import ConfigError, DownloadError, SizeLimitError
from watchdog_updater.fetch import Fetcher, FetchSettings, require_secure_url

TARBALL = "/hal0-1.2.3.tar.gz"
MANIFEST = "/stable.json"
PAYLOAD = os.urandom(1_000_000)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()

# Small bounds so that every fault resolves in well under a second or two.
FAST: dict[str, Any] = {
    "connect_timeout_s": 2.0,
    "read_timeout_s": 2.0,
    "deadline_s": 10.0,
    "backoff_s": 0.01,
}

MakeFetcher = Callable[..., Fetcher]


@pytest.fixture(scope="module")
def ca() -> Iterator[TestCA]:
    with TestCA() as test_ca:
        yield test_ca


@pytest.fixture(params=["http", "https"])
def server(request: pytest.FixtureRequest, ca: TestCA) -> Iterator[ReleaseServer]:
    with ReleaseServer(tls=ca if request.param == "https" else None) as release_server:
        yield release_server


@pytest.fixture
def sleeps() -> list[float]:
    """Back-off sleeps taken by fetchers from ``make_fetcher``: one per retry."""
    return []


@pytest.fixture
def make_fetcher(server: ReleaseServer, ca: TestCA, sleeps: list[float]) -> Iterator[MakeFetcher]:
    """A Fetcher for ``server`` (trusting the test CA) with FAST settings plus overrides."""
    fetchers: list[Fetcher] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    def make(**overrides: Any) -> Fetcher:
        fetcher = Fetcher(FetchSettings(**{**FAST, **overrides}), ca_file=ca.ca_file, sleep=sleep)
        fetchers.append(fetcher)
        return fetcher

    yield make
    for fetcher in fetchers:
        fetcher.close()


def part_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


# -- endless data ------------------------------------------------------------------------------


def test_oversized_manifest_refused(server: ReleaseServer, make_fetcher: MakeFetcher) -> None:
    # 1 MB at 10 kB/s: reading up to the 64 KiB cap would take seconds; the announced
    # Content-Length must be refused before the body is read.
    url = server.publish(MANIFEST, PAYLOAD)
    server.slow(MANIFEST, 10_000)
    start = time.monotonic()
    with pytest.raises(SizeLimitError, match=r"stable manifest is 1000000 bytes, above"):
        make_fetcher().fetch_bytes(url, max_bytes=65536, what="stable manifest")
    assert time.monotonic() - start < 3.0  # reading up to the cap would take 6.5 s
    assert len(server.requests_for(MANIFEST)) == 1  # a size refusal is never retried


def test_endless_tarball_refused(
    server: ReleaseServer, make_fetcher: MakeFetcher, tmp_path: Path
) -> None:
    server.endless(TARBALL)
    dest = tmp_path / "hal0.tar.gz"
    with pytest.raises(SizeLimitError, match=r"endless data: tarball exceeded 2000000 bytes"):
        make_fetcher().download(server.url(TARBALL), dest, max_bytes=2_000_000, what="tarball")
    assert not dest.exists()
    assert not part_of(dest).exists()
    assert len(server.requests_for(TARBALL)) == 1


def test_size_cap_failure_leaves_no_part(
    server: ReleaseServer, make_fetcher: MakeFetcher, tmp_path: Path
) -> None:
    dest = tmp_path / "hal0.tar.gz"
    part_of(dest).write_bytes(PAYLOAD[:1000])  # a leftover from an interrupted run
    url = server.publish(TARBALL, PAYLOAD)
    with pytest.raises(SizeLimitError):
        make_fetcher().download(url, dest, max_bytes=500_000, what="tarball")
    assert not part_of(dest).exists()
    assert not dest.exists()


# -- slow and stalled servers ------------------------------------------------------------------


def test_slow_retrieval_refused(
    server: ReleaseServer, make_fetcher: MakeFetcher, tmp_path: Path
) -> None:
    url = server.publish(TARBALL, PAYLOAD)
    server.slow(TARBALL, 2_000)  # would take 500 s
    fetcher = make_fetcher(min_speed_bytes_per_s=20_000, speed_window_s=0.5)
    dest = tmp_path / "hal0.tar.gz"
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"slow retrieval: tarball arrived at \d+ B/s"):
        fetcher.download(url, dest, max_bytes=len(PAYLOAD), what="tarball")
    assert time.monotonic() - start < 3.0
    assert len(server.requests_for(TARBALL)) == 1  # a slow server gets no second chance
    assert 0 < part_of(dest).stat().st_size < len(PAYLOAD)  # kept: the next run resumes


def test_deadline_exceeded(server: ReleaseServer, make_fetcher: MakeFetcher) -> None:
    url = server.publish(TARBALL, PAYLOAD)
    server.slow(TARBALL, 50_000)  # fast enough for the speed check, 20 s in total
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"deadline exceeded: tarball took longer than 0.8 s"):
        make_fetcher(deadline_s=0.8).fetch_bytes(url, max_bytes=len(PAYLOAD), what="tarball")
    assert 0.8 <= time.monotonic() - start < 3.0


def test_hanging_server_times_out(server: ReleaseServer, make_fetcher: MakeFetcher) -> None:
    server.hang(MANIFEST)
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"stable manifest .* failed: timed out"):
        make_fetcher(read_timeout_s=0.3, retries=1).fetch_bytes(
            server.url(MANIFEST), max_bytes=65536, what="stable manifest"
        )
    assert time.monotonic() - start < 3.0
    assert len(server.requests_for(MANIFEST)) == 2  # a timeout is retried


def test_hanging_server_does_not_block_shutdown(server: ReleaseServer, ca: TestCA) -> None:
    server.hang(MANIFEST)
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        client = raw
        if server.base_url.startswith("https"):
            client = ca.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
        client.sendall(b"GET /stable.json HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 2
        while not server.requests_for(MANIFEST) and time.monotonic() < deadline:
            time.sleep(0.01)
        start = time.monotonic()
        server.stop()  # raises if a thread is left behind
        assert time.monotonic() - start < 2.0
        assert client.recv(1) == b""  # the hanging connection was closed, unanswered
        client.close()


# -- broken transfers and resume ---------------------------------------------------------------


def test_truncated_download_resumes_with_range(
    server: ReleaseServer, make_fetcher: MakeFetcher, tmp_path: Path
) -> None:
    url = server.publish(TARBALL, PAYLOAD)
    server.truncate_after(TARBALL, 300_000)
    progress: list[tuple[int, int | None]] = []
    result = make_fetcher().download(
        url,
        tmp_path / "hal0.tar.gz",
        max_bytes=len(PAYLOAD),
        what="tarball",
        progress=lambda done, total: progress.append((done, total)),
    )
    assert [r.range for r in server.requests_for(TARBALL)] == [None, "bytes=300000-"]
    assert result.resumed
    assert result.size == len(PAYLOAD)
    assert result.sha256_hex == PAYLOAD_SHA256
    assert (tmp_path / "hal0.tar.gz").read_bytes() == PAYLOAD
    assert not part_of(tmp_path / "hal0.tar.gz").exists()
    assert progress[-1] == (len(PAYLOAD), len(PAYLOAD))


def test_server_ignoring_range_restarts(
    server: ReleaseServer, make_fetcher: MakeFetcher, tmp_path: Path
) -> None:
    url = server.publish(TARBALL, PAYLOAD)
    server.truncate_after(TARBALL, 300_000)
    server.ignore_range(TARBALL)
    result = make_fetcher().download(
        url, tmp_path / "hal0.tar.gz", max_bytes=len(PAYLOAD), what="tarball"
    )
    assert [r.range for r in server.requests_for(TARBALL)] == [None, "bytes=300000-"]
    assert not result.resumed  # the 200 answer was written from byte zero, not appended
    assert result.sha256_hex == PAYLOAD_SHA256
    assert (tmp_path / "hal0.tar.gz").read_bytes() == PAYLOAD


def test_resume_from_leftover_part_file(
    server: ReleaseServer, make_fetcher: MakeFetcher, tmp_path: Path
) -> None:
    dest = tmp_path / "hal0.tar.gz"
    part_of(dest).write_bytes(PAYLOAD[:400_000])  # left by a killed process
    url = server.publish(TARBALL, PAYLOAD)
    result = make_fetcher().download(url, dest, max_bytes=len(PAYLOAD), what="tarball")
    assert [r.range for r in server.requests_for(TARBALL)] == ["bytes=400000-"]
    assert result.resumed
    assert result.sha256_hex == PAYLOAD_SHA256  # the hash covers the leftover bytes too
    assert dest.read_bytes() == PAYLOAD


def test_complete_leftover_part_file_is_not_downloaded_again(
    server: ReleaseServer, make_fetcher: MakeFetcher, tmp_path: Path
) -> None:
    dest = tmp_path / "hal0.tar.gz"
    part_of(dest).write_bytes(PAYLOAD)  # killed between the last byte and the rename
    url = server.publish(TARBALL, PAYLOAD)
    result = make_fetcher().download(url, dest, max_bytes=len(PAYLOAD), what="tarball")
    assert [r.range for r in server.requests_for(TARBALL)] == [f"bytes={len(PAYLOAD)}-"]
    assert result.resumed
    assert result.sha256_hex == PAYLOAD_SHA256
    assert dest.read_bytes() == PAYLOAD


def test_stale_leftover_part_longer_than_file_restarts(
    server: ReleaseServer, make_fetcher: MakeFetcher, tmp_path: Path
) -> None:
    dest = tmp_path / "hal0.tar.gz"
    part_of(dest).write_bytes(b"x" * (len(PAYLOAD) + 10))  # from some other, larger file
    url = server.publish(TARBALL, PAYLOAD)
    result = make_fetcher(retries=0).download(url, dest, max_bytes=2 * len(PAYLOAD), what="tarball")
    assert [r.range for r in server.requests_for(TARBALL)] == [f"bytes={len(PAYLOAD) + 10}-", None]
    assert not result.resumed
    assert dest.read_bytes() == PAYLOAD


def test_connection_reset_retried(
    server: ReleaseServer, make_fetcher: MakeFetcher, sleeps: list[float]
) -> None:
    url = server.publish(MANIFEST, b'{"version": "1.2.3"}')
    server.reset(MANIFEST, times=2)
    body = make_fetcher(retries=2).fetch_bytes(url, max_bytes=65536, what="stable manifest")
    assert body == b'{"version": "1.2.3"}'
    assert len(server.requests_for(MANIFEST)) == 3
    assert len(sleeps) == 2


def test_5xx_retried_then_ok(
    server: ReleaseServer, make_fetcher: MakeFetcher, sleeps: list[float]
) -> None:
    url = server.publish(MANIFEST, b"{}")
    server.status(MANIFEST, 503, times=2)
    assert make_fetcher(retries=3).fetch_bytes(url, max_bytes=100, what="stable manifest") == b"{}"
    assert len(server.requests_for(MANIFEST)) == 3
    assert len(sleeps) == 2
    assert sleeps[1] > sleeps[0] / 2  # exponential: jittered into [base/2, base], base doubling


def test_5xx_retries_exhausted(server: ReleaseServer, make_fetcher: MakeFetcher) -> None:
    url = server.publish(MANIFEST, b"{}")
    server.status(MANIFEST, 502, times=None)
    with pytest.raises(DownloadError, match=r"HTTP 502 .* stable manifest from http"):
        make_fetcher(retries=2).fetch_bytes(url, max_bytes=100, what="stable manifest")
    assert len(server.requests_for(MANIFEST)) == 3


def test_404_not_retried(
    server: ReleaseServer, make_fetcher: MakeFetcher, sleeps: list[float]
) -> None:
    with pytest.raises(DownloadError, match=r"HTTP 404 .* stable manifest") as info:
        make_fetcher(retries=3).fetch_bytes(
            server.url(MANIFEST), max_bytes=100, what="stable manifest"
        )
    assert info.value.hint is not None and "not (or no longer) published" in info.value.hint
    assert len(server.requests_for(MANIFEST)) == 1
    assert sleeps == []


def test_expected_size_mismatch(
    server: ReleaseServer, make_fetcher: MakeFetcher, tmp_path: Path
) -> None:
    url = server.publish(TARBALL, PAYLOAD)
    dest = tmp_path / "hal0.tar.gz"
    fetcher = make_fetcher(retries=1)
    with pytest.raises(SizeLimitError, match=r"tarball is 1000000 bytes, above the expected"):
        fetcher.download(
            url, dest, max_bytes=2 * len(PAYLOAD), expected_size=999_999, what="tarball"
        )
    assert not part_of(dest).exists()
    with pytest.raises(DownloadError, match=r"short of the expected 1000001 bytes"):
        fetcher.download(
            url, dest, max_bytes=2 * len(PAYLOAD), expected_size=1_000_001, what="tarball"
        )
    assert not dest.exists()
    assert len(server.requests_for(TARBALL)) == 1 + 2  # too long: refused; too short: retried


# -- redirects and transport security ----------------------------------------------------------


def test_redirect_followed(server: ReleaseServer, make_fetcher: MakeFetcher) -> None:
    server.publish("/new.json", b"{}")
    server.redirect(MANIFEST, "/new.json")  # relative Location
    assert make_fetcher().fetch_bytes(server.url(MANIFEST), max_bytes=10, what="manifest") == b"{}"


def test_redirect_to_http_refused(ca: TestCA) -> None:
    with ReleaseServer(tls=ca) as https, ReleaseServer() as http:
        target = http.publish(MANIFEST, b"{}")  # loopback http: fine on its own, not after https
        https.redirect(MANIFEST, target)
        with (
            Fetcher(FetchSettings(**FAST), ca_file=ca.ca_file) as fetcher,
            pytest.raises(DownloadError, match=f"refusing redirect from https to http: {target}"),
        ):
            fetcher.fetch_bytes(https.url(MANIFEST), max_bytes=100, what="stable manifest")
        assert http.requests == []
        assert len(https.requests) == 1


def test_redirect_to_plain_http_elsewhere_refused(
    server: ReleaseServer, make_fetcher: MakeFetcher
) -> None:
    server.redirect(MANIFEST, "http://192.0.2.1/stable.json")
    with pytest.raises(DownloadError, match=r"refusing (redirect to|redirect from https)"):
        make_fetcher().fetch_bytes(server.url(MANIFEST), max_bytes=100, what="stable manifest")


def test_too_many_redirects(server: ReleaseServer, make_fetcher: MakeFetcher) -> None:
    server.redirect("/loop", "/loop")
    with pytest.raises(DownloadError, match=r"too many redirects: manifest still redirected"):
        make_fetcher(max_redirects=3).fetch_bytes(
            server.url("/loop"), max_bytes=10, what="manifest"
        )
    assert len(server.requests_for("/loop")) == 4  # the original request and 3 redirects


def test_plain_http_to_non_loopback_refused(tmp_path: Path) -> None:
    with Fetcher(FetchSettings(**FAST)) as fetcher:
        with pytest.raises(ConfigError, match=r"http://releases.hal0.dev/stable.json"):
            fetcher.fetch_bytes(
                "http://releases.hal0.dev/stable.json", max_bytes=10, what="manifest"
            )
        with pytest.raises(ConfigError, match=r"http://10.0.0.1/x.tar.gz"):
            fetcher.download("http://10.0.0.1/x.tar.gz", tmp_path / "x", max_bytes=10, what="x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "url",
    [
        "https://releases.hal0.dev/stable.json",
        "http://127.0.0.1:8080/a",
        "http://127.9.9.9/a",
        "http://[::1]:8080/a",
        "http://LOCALHOST/a",
    ],
)
def test_secure_urls_accepted(url: str) -> None:
    require_secure_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://releases.hal0.dev/a",
        "http://localhost.evil.example/a",
        "http://128.0.0.1/a",
        "http://[::ffff:8.8.8.8]/a",
        "ftp://127.0.0.1/a",
        "file:///etc/passwd",
        "https:///no-host",
        "https://127.0.0.1:99999/bad-port",
    ],
)
def test_insecure_urls_refused(url: str) -> None:
    with pytest.raises(ConfigError):
        require_secure_url(url)


def test_https_with_test_ca_ok(ca: TestCA) -> None:
    with (
        ReleaseServer(tls=ca) as server,
        Fetcher(FetchSettings(**FAST), ca_file=ca.ca_file) as fetcher,
    ):
        url = server.publish(MANIFEST, b'{"ok": true}')
        assert url.startswith("https://127.0.0.1:")
        assert fetcher.fetch_bytes(url, max_bytes=100, what="stable manifest") == b'{"ok": true}'


def test_https_with_unknown_ca_refused(ca: TestCA) -> None:
    sleeps: list[float] = []
    with (
        TestCA() as other_ca,
        ReleaseServer(tls=ca) as server,
        Fetcher(FetchSettings(**FAST), ca_file=other_ca.ca_file, sleep=sleeps.append) as fetcher,
    ):
        url = server.publish(MANIFEST, b"{}")
        with pytest.raises(DownloadError, match=r"TLS certificate is not trusted") as info:
            fetcher.fetch_bytes(url, max_bytes=100, what="stable manifest")
        assert server.requests == []  # no request was ever sent
    assert sleeps == []  # an untrusted certificate is final, not retried
    assert "CERTIFICATE_VERIFY_FAILED" in info.value.diagnostics()


def test_fetch_settings_bounds() -> None:
    bad: dict[str, Any]
    for bad in (
        {"connect_timeout_s": 0},
        {"read_timeout_s": -1.0},
        {"deadline_s": float("inf")},
        {"speed_window_s": float("nan")},
        {"retries": -1},
        {"max_redirects": 1.5},
        {"min_speed_bytes_per_s": -1},
        {"backoff_s": 3600.0},
        {"user_agent": "x\r\nInjected: 1"},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FetchSettings(**bad)


# -- large downloads: the .part is written a block behind the network ---------------------------

BIG = os.urandom(5 * 1024 * 1024 + 12_345)  # several writer blocks and a partial last one


def test_large_download_truncated_twice_resumes_exactly(
    server: ReleaseServer, make_fetcher: MakeFetcher, tmp_path: Path
) -> None:
    url = server.publish(TARBALL, BIG)
    server.truncate_after(TARBALL, 2_500_000, times=2)  # breaks inside the second block, twice
    dest = tmp_path / "hal0.tar.gz"
    result = make_fetcher().download(url, dest, max_bytes=len(BIG), what="tarball")
    assert [r.range for r in server.requests_for(TARBALL)] == [
        None,
        "bytes=2500000-",
        "bytes=5000000-",
    ]
    assert result.resumed
    assert result.size == len(BIG)
    assert result.sha256_hex == hashlib.sha256(BIG).hexdigest()
    assert dest.read_bytes() == BIG


def test_large_download_range_ignored_restarts_exactly(
    server: ReleaseServer, make_fetcher: MakeFetcher, tmp_path: Path
) -> None:
    url = server.publish(TARBALL, BIG)
    server.truncate_after(TARBALL, 3_000_000)
    server.ignore_range(TARBALL)
    dest = tmp_path / "hal0.tar.gz"
    result = make_fetcher().download(url, dest, max_bytes=len(BIG), what="tarball")
    assert not result.resumed
    assert result.sha256_hex == hashlib.sha256(BIG).hexdigest()
    assert dest.read_bytes() == BIG


def test_interrupted_large_download_keeps_every_byte_received(
    server: ReleaseServer, make_fetcher: MakeFetcher, tmp_path: Path
) -> None:
    """A download that fails keeps all it received in the .part, not only whole blocks."""
    url = server.publish(TARBALL, BIG)
    server.truncate_after(TARBALL, 1_500_000)
    dest = tmp_path / "hal0.tar.gz"
    with pytest.raises(DownloadError, match="broke off"):
        make_fetcher(retries=0).download(url, dest, max_bytes=len(BIG), what="tarball")
    assert part_of(dest).read_bytes() == BIG[:1_500_000]
    server.clear_faults(TARBALL)
    result = make_fetcher().download(url, dest, max_bytes=len(BIG), what="tarball")
    assert server.requests_for(TARBALL)[-1].range == "bytes=1500000-"
    assert result.sha256_hex == hashlib.sha256(BIG).hexdigest()


def test_disk_full_during_download(
    server: ReleaseServer,
    make_fetcher: MakeFetcher,
    tmp_path: Path,
    mount_tmpfs: Callable[[Path, str], None],
) -> None:
    """ENOSPC on the writer thread reaches the caller as a DownloadError with a hint."""
    small = tmp_path / "small"
    mount_tmpfs(small, "size=2m")
    url = server.publish(TARBALL, BIG)
    dest = small / "hal0.tar.gz"
    with pytest.raises(DownloadError, match="No space left on device") as caught:
        make_fetcher(retries=0).download(url, dest, max_bytes=len(BIG), what="tarball")
    assert caught.value.hint is not None and "free disk space" in caught.value.hint
    assert not dest.exists()
    part = part_of(dest)
    assert BIG.startswith(part.read_bytes())  # whatever is on disk is a prefix: resumable
