"""MESHGATE_WASM_CALLSTATS: the opt-in report of time spent in calls into wasm."""

from __future__ import annotations

import cProfile
import os
import pstats
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from meshgate.gateway.wasm import HeaderMap
from meshgate.gateway.wasm._rawcall import CROSSING

from .wat import plugin

REPO = Path(__file__).resolve().parents[3]
SCRIPT = """
import asyncio
import wasmtime
from meshgate.gateway.wasm import HeaderMap, HostServices, PluginHost, PluginSpec
from tests.unit.wasm.wat import plugin

async def main() -> None:
    services = HostServices()
    host = await PluginHost.create(PluginSpec("probe", bytes(wasmtime.wat2wasm(plugin()))),
                                   services)
    for _ in range(3):
        stream = host.new_stream()
        await stream.request_headers(HeaderMap([(":path", "/")]), True)
        stream.finish()
    await host.close()
    services.close()

asyncio.run(main())
"""


def run(env_value: str | None, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MESHGATE_WASM_CALLSTATS"}
    if env_value is not None:
        env["MESHGATE_WASM_CALLSTATS"] = env_value
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=True)


def test_report_lists_each_callback_with_its_call_count(tmp_path: Path) -> None:
    report = tmp_path / "calls.txt"
    run(str(report), tmp_path)
    lines = report.read_text().splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  ")}
    assert rows["proxy_on_request_headers"][0] == "3"
    assert float(rows["proxy_on_request_headers"][1]) > 0  # wall µs per call
    assert any(line.startswith("threads: MainThread") for line in lines)


def test_without_the_variable_nothing_is_reported(tmp_path: Path) -> None:
    result = run(None, tmp_path)
    assert "wasm outermost calls" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(CROSSING != "ctypes", reason="compiled crossings run no Python frame; "
                    "tests/run_all.sh runs this with MESHGATE_WASM_CROSSING=ctypes")
async def test_a_profile_shows_each_call_signature_on_its_own_row(load: Any) -> None:
    # Callbacks of different signatures (context create: (ii)->(), request headers:
    # (iii)->(i), done: (i)->(i)) must not share one cProfile row.
    host = await load(plugin())
    profiler = cProfile.Profile()
    profiler.enable()
    stream = host.new_stream()
    await stream.request_headers(HeaderMap([(":path", "/")]), True)
    stream.finish()
    profiler.disable()
    files = {key[0] for key in pstats.Stats(profiler).stats}  # type: ignore[attr-defined]
    calls = {f for f in files if f.startswith("<wasm call")}
    assert {"<wasm call (ii)->(-)>", "<wasm call (iii)->(i)>", "<wasm call (i)->(i)>"} <= calls
