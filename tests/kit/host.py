"""A hal0 host under a root prefix: layout, hal0.toml, an installed version, and the CLI.

Everything lives in one folder, as on a real host under ``/``. The CLI runs as a real subprocess
(``python -m watchdog_updater --root ROOT``), optionally inside the systemd sandbox's namespaces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.kit.channel import simple_release_tarball
from watchdog_updater.layout import Layout

PROJECT = Path(__file__).resolve().parents[2]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(document: Mapping[str, Any], prefix: str = "") -> str:
    """A tiny TOML writer for test configurations (tables, arrays of tables, scalars, lists)."""
    scalars: list[str] = []
    tables: list[str] = []
    for key, value in document.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping) and not key.startswith("="):
            tables.append(to_toml(value, name))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for item in value:
                body = "\n".join(f"{k} = {_toml_value(v)}" for k, v in item.items())
                tables.append(f"[[{name}]]\n{body}\n")
        else:
            scalars.append(f"{key} = {_toml_value(value)}")
    head = f"[{prefix}]\n" if prefix and scalars else ""
    text = head + "".join(s + "\n" for s in scalars)
    return text + ("\n" if text and tables else "") + "\n".join(tables)


def merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


class Host:
    """A hal0 installation under ``root`` that the updater under test manages."""

    def __init__(self, root: Path, *, style: str = "seed") -> None:
        self.root = root
        self.layout = Layout(root=root, style=style)  # type: ignore[arg-type]
        self.config_path = self.layout.config_path
        self.sentinel = root / "etc/hal0/sentinel.txt"  # config must never change
        self.data_sentinel = root / "var/lib/hal0/models/sentinel.bin"  # nor data

    def prepare(self) -> None:
        self.layout.lib_dir.mkdir(parents=True, exist_ok=True)
        self.sentinel.parent.mkdir(parents=True, exist_ok=True)
        self.sentinel.write_text("operator config\n")
        self.data_sentinel.parent.mkdir(parents=True, exist_ok=True)
        self.data_sentinel.write_bytes(b"model weights")

    def write_config(
        self,
        *,
        manifest_base: str,
        trusted_root: Path,
        ca_file: Path | None = None,
        channel: str = "stable",
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        update: dict[str, Any] = {
            "channel": channel,
            "manifest_url": manifest_base.rstrip("/") + "/{channel}.json",
            "layout": self.layout.style,
            "verify": {"trusted_root": str(trusted_root)},
            "download": {"retries": 1, "backoff": 0.05, "read_timeout": 5, "connect_timeout": 5},
            "services": {"restart": []},
            # Without systemd: the gate runs one command probe; systemd tests override this.
            "health": {
                "units": [],
                "slots": False,
                "http": [],
                "interval": 0.05,
                "consecutive": 1,
                "deadline": 10,
                "command": [{"name": "ok", "argv": ["true"]}],
            },
        }
        if ca_file is not None:
            update["download"]["ca_file"] = str(ca_file)
        document = {"update": merge(update, extra or {})}
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            '# hal0.toml written by the test kit\n[telemetry]\nchannel = "stable"\n\n'
            + to_toml(document)
        )
        return self.config_path

    def install_initial(self, version: str, tarball: bytes | None = None) -> Path:
        """Lay down ``version`` as if an earlier update had installed it, and make it current."""
        import io
        import tarfile

        target = self.layout.version_dir(version)
        target.parent.mkdir(parents=True, exist_ok=True)
        data = tarball or simple_release_tarball(version)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            tar.extractall(target.parent, filter="data")
        extracted = target.parent / f"hal0-{version}"
        if extracted != target:
            extracted.rename(target)
        link = self.layout.current_link
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(".current.tmp")
        tmp.symlink_to(self.layout.link_target_for(version))
        tmp.replace(link)
        return target

    def current(self) -> str | None:
        link = self.layout.current_link
        if not link.is_symlink():
            return None
        return self.layout.resolve_link_target(os.readlink(link)).name.removeprefix("hal0-")

    def cli_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "watchdog_updater", "--root", str(self.root), *args]

    def cli(
        self,
        *args: str,
        prefix: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*prefix, *self.cli_argv(*args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=PROJECT,
            env={**os.environ, "NO_COLOR": "1", **(env or {})},
            check=False,
        )

    def cli_json(self, *args: str, **kw: Any) -> tuple[int, Any]:
        proc = self.cli(*args, "--json", **kw)
        try:
            return proc.returncode, json.loads(proc.stdout)
        except ValueError as e:
            raise AssertionError(f"not JSON: {proc.stdout!r}\nstderr: {proc.stderr}") from e
