"""Instructions per request inside the running sidecar, bare and with rate-limit + auth,
counted by valgrind: the share the targets are about, in a unit this machine's drift
cannot blur.

Run: .venv/bin/python bench/sidecar_instructions.py [--seconds 8] [--rounds 2]

The control server, the upstream and the sidecar start as in `bench/sidecar_bench.py`,
the sidecar under `valgrind --tool=callgrind`. For each target, in interleaved rounds,
the sidecar's counters are zeroed (`callgrind_control -z PID`), `wrk -t1 -c1` sends
requests for `--seconds`, and the counters are dumped: the instructions of that window
over wrk's request count. Everything the process runs in the window is in it (all
threads, the event loop, the kernel's share excepted), so work that runs by the clock
(the epoch clock's ticks, timers) weighs more than under real load: valgrind runs the
sidecar tens of times slower.

Needs valgrind and wrk. About five minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sidecar_bench import PY, process, sidecar_args, start_mesh, wait_ok, wrk

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("bare", "plugged")


def dumped_instructions(folder: Path, trigger: str) -> int:
    """The instruction total of the dump `callgrind_control -d TRIGGER` asked for."""
    for dump in folder.glob("callgrind.*"):
        text = dump.read_text(errors="replace")
        if re.search(rf"^desc: Trigger: dump {trigger}$", text, re.MULTILINE):
            found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
            if found:
                return int(found.group(1))
    raise SystemExit(f"no callgrind dump for {trigger} in {folder}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install valgrind wrk")
    tmp = Path(tempfile.mkdtemp(prefix="meshgate-instructions-"))
    print(f"callgrind dumps (kept, for callgrind_annotate): {tmp}", flush=True)
    per_request: dict[str, list[float]] = {t: [] for t in TARGETS}
    with contextlib.ExitStack() as stack:
        ports = start_mesh(stack, tmp)
        sidecar = stack.enter_context(process(
            ["valgrind", "--tool=callgrind", "--smc-check=all-non-file",
             f"--callgrind-out-file={tmp}/callgrind.%p", PY,
             *sidecar_args(ports["xds"], ports["admin"], "instructions-bench")],
            tmp / "sidecar.log"))  # fmt: skip
        for target in TARGETS:
            wait_ok(f"http://127.0.0.1:{ports[target]}/", timeout=300)
            wrk(f"http://127.0.0.1:{ports[target]}/", 3, 1)  # warm up
        for round_ in range(args.rounds):
            for target in TARGETS:
                pid = str(sidecar.pid)
                subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
                result = wrk(f"http://127.0.0.1:{ports[target]}/", args.seconds, 1)
                trigger = f"{target}{round_}"
                subprocess.run(["callgrind_control", "-d", trigger, pid], check=True,
                               capture_output=True)
                time.sleep(1)  # the dump is written by the sidecar's own thread
                count = dumped_instructions(tmp, trigger) / result["requests"]
                per_request[target].append(count)
                print(f"round {round_} {target}: {result['requests']:.0f} requests, "
                      f"{count:,.0f} instructions a request", flush=True)
    bare, plugged = (statistics.median(per_request[t]) for t in TARGETS)
    print(f"median: bare {bare:,.0f}, rate-limit + auth {plugged:,.0f}; the plugins' share "
          f"{plugged - bare:,.0f} instructions a request, {(plugged - bare) / bare:.1%} of "
          f"bare (the 20 % target counts CPU time)")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
