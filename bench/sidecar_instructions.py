"""Instructions per request inside the running sidecar, bare and with rate-limit + auth,
counted by valgrind: the share the targets are about, in a unit this machine's drift
cannot blur.

Run: .venv/bin/python bench/sidecar_instructions.py [--seconds 8] [--rounds 2]
     .venv/bin/python bench/sidecar_instructions.py --cache-sim [--connections 16]
                                                    [--gc-young-threshold N]

The control server, the upstream and the sidecar start as in `bench/sidecar_bench.py`,
the sidecar under `valgrind --tool=callgrind`. For each target, in interleaved rounds,
the sidecar's counters are zeroed (`callgrind_control -z PID`), `wrk -t1 -cN` sends
requests for `--seconds`, and the counters are dumped: the instructions of that window
over wrk's request count. Everything the process runs in the window is in it (all
threads, the event loop, the kernel's share excepted), so work that runs by the clock
(the epoch clock's ticks, timers) weighs more than under real load: valgrind runs the
sidecar tens of times slower.

`--cache-sim` also simulates this machine's per-core caches, as Linux reports CPU 0's in
`/sys/devices/system/cpu/cpu0/cache` (callgrind's last level stands for the L2; where
that is unreadable, 32 KiB L1i and L1d and a 512 KiB L2, 8-way), and prints, per
request, the misses of each level for instructions and data, and which libraries the
plugged request's extra L2 and L1 misses fall in. With 16 connections the requests interleave
as under load, so a plugged request finds its code and data evicted by the others'
work: the misses explain why the plugins' CPU share exceeds their instruction share
(decision 2100).

Needs valgrind and wrk. About five minutes (ten with `--cache-sim`).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from sidecar_bench import (
    PY,
    add_threshold_option,
    process,
    sidecar_args,
    start_mesh,
    threshold_args,
    wait_ok,
    wrk,
)

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("bare", "plugged")
#: Caches per core where the machine's cannot be read: L1i, L1d and L2 (callgrind's "LL").
FALLBACK_CACHES = ("--I1=32768,8,64", "--D1=32768,8,64", "--LL=524288,8,64")
SYS_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


def machine_caches() -> tuple[str, ...]:
    """callgrind's options for CPU 0's L1i, L1d and L2 as Linux describes them."""
    found: dict[str, str] = {}
    for index in sorted(SYS_CACHES.glob("index*")):
        try:
            level, kind, size, ways, line = (
                (index / name).read_text().strip()
                for name in ("level", "type", "size", "ways_of_associativity",
                             "coherency_line_size"))  # fmt: skip
        except OSError:
            continue
        option = {("1", "Instruction"): "I1", ("1", "Data"): "D1",
                  ("2", "Unified"): "LL"}.get((level, kind))
        if option and size.endswith("K"):
            found[option] = f"--{option}={int(size[:-1]) * 1024},{ways},{line}"
    if len(found) != 3:
        return FALLBACK_CACHES
    return tuple(found[o] for o in ("I1", "D1", "LL"))


#: The cache-miss events of callgrind this bench prints, and its names for them.
MISSES = {"I1mr": "L1i", "ILmr": "L2 instr", "D1mr": "L1d read", "D1mw": "L1d write",
          "DLmr": "L2 data read", "DLmw": "L2 data write"}
#: The L2's: the misses that cost tens of cycles each.
L2_MISSES = ("ILmr", "DLmr", "DLmw")
#: The L1's, each served from the L2 here.
L1_MISSES = ("I1mr", "D1mr", "D1mw")


def dump_of(folder: Path, trigger: str) -> str:
    """The text of the dump `callgrind_control -d TRIGGER` asked for."""
    for dump in folder.glob("callgrind.*"):
        text = dump.read_text(errors="replace")
        if re.search(rf"^desc: Trigger: dump {trigger}$", text, re.MULTILINE):
            return text
    raise SystemExit(f"no callgrind dump for {trigger} in {folder}")


def events_of(text: str) -> list[str]:
    """The dump's events, in the order of its cost columns (`Ir`, then any misses)."""
    found = re.search(r"^events: (.*)$", text, re.MULTILINE)
    if found is None:
        raise SystemExit("a callgrind dump without its events line")
    return found.group(1).split()


def totals(text: str) -> dict[str, int]:
    found = re.search(r"^(?:summary|totals): (.*)$", text, re.MULTILINE)
    if found is None:
        raise SystemExit("a callgrind dump without totals")
    return dict(zip(events_of(text), map(int, found.group(1).split()), strict=True))


def by_object(text: str) -> dict[str, dict[str, int]]:
    """Each library's own cost by event (its functions' exclusive costs summed).

    callgrind's format: `ob=` names the object of the cost lines that follow, written
    `(id) name` where the object first appears (there or in a callee's `cob=`) and
    `(id)` after; a `calls=` line is followed by the inclusive cost of that call, which
    belongs to the callee and is skipped here."""
    names = events_of(text)
    known: dict[str, str] = {}
    costs: dict[str, list[int]] = defaultdict(lambda: [0] * len(names))
    current, skip = "???", False
    for line in text.splitlines():
        if line.startswith(("ob=", "cob=")):
            ident, _, name = line.partition("=")[2].partition(" ")
            if name:
                known[ident] = name
            if line.startswith("ob="):
                current = known.get(ident, ident)
        elif line.startswith("calls="):
            skip = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            if skip:
                skip = False
                continue
            row = costs[current]
            for i, value in enumerate(line.split()[1:]):
                row[i] += int(value)
    return {Path(ob).name: dict(zip(names, row, strict=True)) for ob, row in costs.items()}


def per_request(costs: dict[str, int], requests: float) -> dict[str, float]:
    return {event: value / requests for event, value in costs.items()}


def print_misses(figures: dict[str, list[dict[str, float]]]) -> None:
    medians = {t: {e: statistics.median(r[e] for r in figures[t]) for e in figures[t][0]}
               for t in TARGETS}  # fmt: skip
    print("\nper request (medians)  " + "".join(f"{t:>12}" for t in TARGETS) + "       ratio")
    for event, label in {"Ir": "instructions", **MISSES}.items():
        bare, plugged = (medians[t][event] for t in TARGETS)
        print(f"{label:22} {bare:12,.0f}{plugged:12,.0f}{plugged / bare:12.2f}")


def print_objects(objects: dict[str, list[dict[str, dict[str, float]]]]) -> None:
    """The plugged request's extra misses by library (round 0 of each target): in the L2,
    and in the L1 (where a machine whose L2 holds the whole sidecar loses its time)."""
    bare, plugged = objects["bare"][0], objects["plugged"][0]
    zero = dict.fromkeys(MISSES, 0.0)
    extra = {ob: {e: plugged.get(ob, zero)[e] - bare.get(ob, zero)[e] for e in MISSES}
             for ob in set(bare) | set(plugged)}  # fmt: skip
    for title, events in (("L2", L2_MISSES), ("L1", L1_MISSES)):
        print(f"\nextra {title} misses a plugged request, by library (??? is the plugins' "
              "compiled code)")
        print(f"{'library':44}{'instr':>8}{'data rd':>9}{'data wr':>9}")
        ranked = sorted(extra.items(), key=lambda kv: -sum(kv[1][e] for e in events))
        for ob, row in ranked[:10]:
            instr, data_read, data_write = (row[e] for e in events)
            print(f"{ob[:44]:44}{instr:8.0f}{data_read:9.0f}{data_write:9.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache-sim", action="store_true",
                        help="also simulate this machine's L1 and L2 caches")
    parser.add_argument("--connections", type=int, default=None,
                        help="wrk's connections (default 1, with --cache-sim 16)")
    add_threshold_option(parser, "the simulated sidecar's")
    args = parser.parse_args()
    connections = args.connections or (16 if args.cache_sim else 1)
    for tool in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install valgrind wrk")
    tmp = Path(tempfile.mkdtemp(prefix="meshgate-instructions-"))
    print(f"callgrind dumps (kept, for callgrind_annotate): {tmp}", flush=True)
    figures: dict[str, list[dict[str, float]]] = {t: [] for t in TARGETS}
    objects: dict[str, list[dict[str, dict[str, float]]]] = {t: [] for t in TARGETS}
    cache = ["--cache-sim=yes", *machine_caches()] if args.cache_sim else []
    if cache:
        print(f"simulated caches: {' '.join(cache[1:])}", flush=True)
    with contextlib.ExitStack() as stack:
        ports = start_mesh(stack, tmp)
        sidecar = stack.enter_context(process(
            ["valgrind", "--tool=callgrind", "--smc-check=all-non-file", *cache,
             f"--callgrind-out-file={tmp}/callgrind.%p", PY,
             *sidecar_args(ports["xds"], ports["admin"], "instructions-bench"),
             *threshold_args(args.gc_young_threshold)],
            tmp / "sidecar.log"))  # fmt: skip
        for target in TARGETS:
            wait_ok(f"http://127.0.0.1:{ports[target]}/", timeout=300)
            wrk(f"http://127.0.0.1:{ports[target]}/", 3, connections)  # warm up
        for round_ in range(args.rounds):
            for target in TARGETS:
                pid = str(sidecar.pid)
                subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
                result = wrk(f"http://127.0.0.1:{ports[target]}/", args.seconds, connections)
                trigger = f"{target}{round_}"
                subprocess.run(["callgrind_control", "-d", trigger, pid], check=True,
                               capture_output=True)
                time.sleep(1)  # the dump is written by the sidecar's own thread
                text = dump_of(tmp, trigger)
                figures[target].append(per_request(totals(text), result["requests"]))
                if args.cache_sim:
                    objects[target].append({ob: per_request(c, result["requests"])
                                            for ob, c in by_object(text).items()})
                print(f"round {round_} {target}: {result['requests']:.0f} requests, "
                      f"{figures[target][-1]['Ir']:,.0f} instructions a request", flush=True)
    bare, plugged = (statistics.median(r["Ir"] for r in figures[t]) for t in TARGETS)
    print(f"median: bare {bare:,.0f}, rate-limit + auth {plugged:,.0f}; the plugins' share "
          f"{plugged - bare:,.0f} instructions a request, {(plugged - bare) / bare:.1%} of "
          f"bare (the 20 % target counts CPU time)")
    if args.cache_sim:
        print_misses(figures)
        print_objects(objects)


if __name__ == "__main__":
    main()
