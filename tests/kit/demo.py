"""`make demo`: the whole product on a sandboxed hal0, narrated step by step.

It builds the same appliance the tests use (tests/kit/appliance.py): a private systemd running fake
hal0-api, two slots and OpenWebUI from `current`, a signed channel over HTTPS on loopback (private
Sigstore CA), and the updater daemon with its metrics endpoint. Then: check, update to 1.1.0 (the
gate passes), publish 1.2.0 which crash-loops, run the nightly job now, watch the gate fail and the
automatic rollback, 1.2.0 quarantined, then status, history and an excerpt of /metrics.

Everything it starts lives in a temporary directory and in the sandbox's PID namespace: leaving
(normally, on an error or on Ctrl-C) kills exactly that and removes the directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.kit.appliance import Appliance, appliance
from tests.kit.fake_hal0 import free_port
from tests.kit.systemd_sandbox import sandbox_unavailable_reason

STEP = 0


def say(title: str) -> None:
    global STEP
    STEP += 1
    print(
        f"\n\033[1m[{STEP}] {title}\033[0m" if sys.stdout.isatty() else f"\n[{STEP}] {title}",
        flush=True,
    )


def show(proc: subprocess.CompletedProcess[str], command: str) -> None:
    print(f"$ watchdog-updater {command}   (exit {proc.returncode})")
    for line in (proc.stdout + proc.stderr).strip().splitlines():
        print(f"    {line}")


def run(app: Appliance, *args: str) -> subprocess.CompletedProcess[str]:
    proc = app.cli(*args)
    show(proc, " ".join(args))
    return proc


def wait_http(url: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return str(r.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def metrics_excerpt(text: str) -> list[str]:
    keep = (
        "hal0_updater_installed_version_info",
        "hal0_updater_available_version_info",
        "hal0_updater_update_attempts_total",
        "hal0_updater_rollbacks_total",
        "hal0_updater_quarantined_version",
        "hal0_updater_probe_last_success",
        "hal0_updater_frozen",
        "hal0_updater_state{",
        "hal0_updater_daemon_heartbeat",
    )
    lines = []
    for line in text.splitlines():
        if (line.startswith(keep) and not line.rstrip().endswith(" 0.0")) or line.startswith(
            ("hal0_updater_frozen", "hal0_updater_quarantined_versions ")
        ):
            lines.append(line)
    return lines


def demo(workdir: Path) -> int:
    started = time.monotonic()
    say("Bringing up a sandboxed hal0 1.0.0: private systemd, fake hal0-api, 2 slots, OpenWebUI")
    with appliance(workdir) as app:
        print(
            f"    root {app.host.root}; channel {app.server.base_url} (HTTPS, private Sigstore CA)"
        )
        for unit in (
            "hal0-api.service",
            "hal0-slot@a.service",
            "hal0-slot@b.service",
            "hal0-openwebui.service",
        ):
            print(f"    {unit}: {app.unit(unit)['ActiveState']}")
        metrics_port = free_port()
        app.configure(metrics={"listen": f"127.0.0.1:{metrics_port}"})
        say(f"Starting the updater daemon (metrics on 127.0.0.1:{metrics_port})")
        daemon = subprocess.Popen(
            app.cli_argv("daemon"),
            stdout=subprocess.DEVNULL,
            stderr=(workdir / "daemon.log").open("w"),
            cwd=Path(__file__).resolve().parents[2],
            start_new_session=True,
        )
        try:
            wait_http(f"http://127.0.0.1:{metrics_port}/metrics", 30)
            print(
                "    daemon is up: journal recovery ran, READY sent, next run planned for 03:00 + jitter"
            )

            say("Release 1.1.0 (healthy) is published and signed; the operator checks")
            app.publish("1.1.0", "healthy")
            run(app, "update", "--check")

            say("Updating to 1.1.0: verify, unpack, swap `current`, restart hal0-api, health gate")
            proc = run(app, "update")
            if proc.returncode != 0:
                return proc.returncode

            say("Release 1.2.0 is published: it crash-loops right after start")
            app.publish("1.2.0", "crash_at_start")
            print("    (signed like any good release: only the health gate can catch it)")

            say("The nightly run, triggered now (the same scheduled job the timer runs)")
            proc = run(app, "daemon", "--once")
            print(f"    exit {proc.returncode}: 4 means rolled back and the old version is healthy")

            say("1.2.0 is quarantined: never applied automatically again")
            run(app, "quarantine", "list")
            run(app, "update", "--check")

            say("Status and history")
            run(app, "status")
            run(app, "history")

            say(f"An excerpt of the daemon's /metrics (127.0.0.1:{metrics_port})")
            for line in metrics_excerpt(wait_http(f"http://127.0.0.1:{metrics_port}/metrics", 10)):
                print(f"    {line}")
            api = json.loads(wait_http(f"http://127.0.0.1:{app.ports.api}/api/health", 5))
            print(f"\n    hal0-api answers {api} — still serving 1.1.0")
        finally:
            daemon.terminate()
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
    print(f"\nDemo finished in {time.monotonic() - started:.0f} s; everything it started is gone.")
    return 0


def main() -> int:
    if os.geteuid() != 0:
        print(
            "make demo needs root: it runs a private systemd in its own PID and mount namespaces "
            "(unshare) and mounts a tmpfs on its /run. Run it as root, e.g. `sudo make demo`.",
            file=sys.stderr,
        )
        return 2
    reason = sandbox_unavailable_reason()
    if reason:
        print(f"make demo cannot start the systemd sandbox: {reason}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="watchdog-updater-demo-"))
    try:
        return demo(workdir)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up what the demo started", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
