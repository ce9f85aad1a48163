"""Live reload: poll the config file (and the plugin binaries it names) for changes.

Polling a handful of `stat` calls is cheap, works on every filesystem (including the
bind mounts and ConfigMap symlink swaps of Kubernetes), and needs no extra dependency.
Changes are debounced: a file must stay unchanged for `settle` seconds before it is read,
so an editor's write-rename dance or a burst of saves becomes one push.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from meshgate.xds.config import ConfigError, MeshConfig, load_file

log = logging.getLogger("meshgate.xds.watch")

Fingerprint = tuple[tuple[str, float, int, int], ...]


def fingerprint(paths: list[Path]) -> Fingerprint:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((str(path), st.st_mtime, st.st_size, st.st_ino))
        except OSError:
            out.append((str(path), 0.0, -1, 0))
    return tuple(out)


def watched_paths(config_path: Path, config: MeshConfig) -> list[Path]:
    return [config_path, *(p.wasm_path for p in config.plugins)]


async def watch_config(
    path: Path,
    current: MeshConfig,
    apply: Callable[[MeshConfig], None],
    reject: Callable[[str], None],
    *,
    interval: float = 0.1,
    settle: float = 0.1,
) -> None:
    paths = watched_paths(path, current)
    seen = fingerprint(paths)
    while True:
        await asyncio.sleep(interval)
        now = fingerprint(paths)
        if now == seen:
            continue
        await asyncio.sleep(settle)
        if fingerprint(paths) != now:
            continue  # still being written; look again next round
        seen = now
        try:
            config = load_file(path)
        except ConfigError as exc:
            log.error("config change rejected, still serving the last good config: %s", exc)
            reject(str(exc))
            continue
        paths = watched_paths(path, config)
        seen = fingerprint(paths)
        apply(config)
