"""Instructions a request inside the plugins' own code, by function, counted by valgrind.

Run: .venv/bin/python bench/guest_functions.py --plugins DIR [-n 1000] [--top 40]
     [--baseline DIR]

The request is `bench/chain_instructions.py`'s (rate-limit + auth through `PluginChain`,
no sockets), in a child under `valgrind --tool=callgrind`, with its warm-up alone and
with n requests more; the difference over n is one request. wasmtime compiles the plugins with its
perf-map profiler on, so each child writes `/tmp/perf-PID.map`, which names the address
ranges of the compiled code; callgrind's counts for those addresses are summed by
function. Printed: the guests' instructions a request in all, then the functions, most
first. The host's side (the crossings, the interpreter) is `chain_instructions.py`'s.

`--baseline DIR` counts another build the same way (e.g. the plugins before a change)
and prints this build's total over the baseline's, then the functions whose count changed
most.

Function names come from the modules' name section, which the release build strips.
Build a copy that keeps it for DIR:

    cd plugins && CARGO_PROFILE_RELEASE_STRIP=false CARGO_TARGET_DIR=/tmp/named \\
        cargo build --release --target wasm32-wasip1 -p auth -p rate-limit
    # DIR: /tmp/named/wasm32-wasip1/release (rate_limit.wasm, auth.wasm)

The code is the same as the stripped build's. Without names the functions show as
`wasm[0]::function[N]`. Needs valgrind; about two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JIT_LINE = re.compile(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+\?\?\?:0x([0-9a-f]+)\S* \[\?\?\?\]")
HASH_SUFFIX = re.compile(r"(::h[0-9a-f]{16}|17h[0-9a-f]{16}E)$")


def child(extra: int, plugins: Path, cache: Path) -> None:
    """`chain_instructions`'s child ("with", `extra` requests after its warm-up), its
    modules compiled with wasmtime's perf map on."""
    import wasmtime
    from chain_instructions import child as one_run  # bench/ is on sys.path

    init = wasmtime.Config.__init__

    def with_perf_map(self: wasmtime.Config, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)
        self.profiler = "perfmap"

    wasmtime.Config.__init__ = with_perf_map  # type: ignore[method-assign]
    asyncio.run(one_run("with", extra, plugins, cache))


def counted(extra: int, plugins: Path, cache: Path, out: Path) -> tuple[Path, Path]:
    """Runs the child under callgrind: its callgrind file and its perf map."""
    from chain_instructions import under_callgrind

    report = under_callgrind(__file__, ["--child", str(extra), "--plugins", str(plugins),
                                        "--cache", str(cache)], REPO, str(out))
    pid = re.search(r"^==(\d+)==", report, re.M)
    if pid is None:
        raise SystemExit(f"no process id in valgrind's report:\n{report[-2000:]}")
    return out, Path(f"/tmp/perf-{pid.group(1)}.map")


def by_function(callgrind: Path, perf_map: Path) -> collections.Counter[str]:
    ranges = []
    for line in perf_map.read_text().splitlines():
        start, size, name = line.split(" ", 2)
        ranges.append((int(start, 16), int(size, 16), name))
    ranges.sort()
    starts = [r[0] for r in ranges]
    text = subprocess.run(["callgrind_annotate", "--threshold=100", str(callgrind)],
                          capture_output=True, text=True, check=True).stdout
    counts: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        found = JIT_LINE.match(line)
        if found is None:
            continue
        address = int(found.group(2), 16)
        i = bisect.bisect_right(starts, address) - 1
        inside = i >= 0 and address < ranges[i][0] + ranges[i][1]
        name = ranges[i][2] if inside else "(outside the plugins' code)"
        name = HASH_SUFFIX.sub("", re.sub(r"^wasm\[\d+\]::function\[\d+\]::", "", name))
        counts[name] += int(found.group(1).replace(",", ""))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plugins", type=Path, default=REPO / "build/plugins")
    parser.add_argument("-n", type=int, default=1000, help="requests counted")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="another build of the plugins, counted the same way: the "
                        "ratio of the totals and the functions that changed most")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.plugins, args.cache)
        return
    counts = per_request(args.plugins, args.n)
    total = sum(counts.values())
    print(f"{args.plugins}: the plugins' own code runs {total:,.0f} instructions a request")
    if args.baseline is not None:
        base = per_request(args.baseline, args.n)
        print(f"{args.baseline} (baseline): {sum(base.values()):,.0f}; "
              f"this build / baseline: {total / sum(base.values()):.3f}")
        print("largest differences, instructions a request (this build - baseline):")
        changes = collections.Counter({name: counts[name] - base[name]
                                       for name in counts | base})
        for name, change in sorted(changes.items(), key=lambda kv: -abs(kv[1]))[:args.top]:
            print(f"{change:+9,.0f}  {name[:110]}")
        return
    for name, count in counts.most_common(args.top):
        print(f"{count:9,.0f}  {name[:110]}")


def per_request(plugins: Path, n: int) -> collections.Counter[str]:
    """The guests' instructions a request by function, for the plugins in `plugins`."""
    with tempfile.TemporaryDirectory(prefix="meshgate-guest-") as tmp:
        work = Path(tmp)
        # Compiled under valgrind first (see chain_instructions.measure): both counted
        # runs load the modules from the cache.
        for path in counted(0, plugins, work / "cache", work / "cg.compile"):
            path.unlink(missing_ok=True)
        runs = [counted(extra, plugins, work / "cache", work / f"cg.{extra}")
                for extra in (0, n)]
        before, after = (by_function(*run) for run in runs)
        for _, perf_map in runs:
            perf_map.unlink(missing_ok=True)
    return collections.Counter({name: (after[name] - before[name]) / n
                                for name in after | before})

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
