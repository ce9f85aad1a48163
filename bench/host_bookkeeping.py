"""How much of a plugged request's CPU is the host's bookkeeping, with no guest code run.

Run: .venv/bin/python bench/host_bookkeeping.py [--seconds 4] [--rounds 5] [--pin]
     [--keep DIR]

`bench/sidecar_bench.py` counts what the rate-limit + auth pair costs a request by
subtraction: the plugged listener's CPU a request less the bare one's. That figure holds
two parts, and this bench splits them:

- the host's bookkeeping around the callbacks: the request's streams and contexts, the
  phases' header maps and body buffer, the checks and state changes of each callback,
  the closing batch;
- the callbacks themselves: wasmtime's entry, the guests' code and the host functions
  they call, and what their edits cost the rest of the request (the headers they add).

It copies this tree's tracked files (as they are in the working tree) to a temporary
directory, changes one line of the compiled driver there (`vm_call` answers None, as for
a callback the plugin does not export, before anything is called), builds that copy
profile-guided as `make setup` builds this one, and runs `bench/sidecar_bench.py`'s
rounds with that copy as `--compare`. Its plugged listener drives every stream and phase
as the data path does and runs no guest code, so its CPU over its bare listener's is the
bookkeeping; this tree's share less that one is the callbacks'.

A measurement only: the copy's plugins decide nothing (no API key is checked), and it is
removed after the run (`--keep DIR` builds it in DIR and leaves it). Needs wrk, as
`bench/sidecar_bench.py`, and about two minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from sidecar_bench import PY, REPO, cpu_over, run

DRIVER = Path("meshgate/gateway/wasm/_driver.h")
#: `vm_call`'s first lines: a callback the plugin does not export answers None at once.
NO_EXPORT = "    if (call == NULL)\n        Py_RETURN_NONE;\n    if (arm_deadline(vm) < 0)"
NO_CALL = "    if (call == NULL || 1)\n        Py_RETURN_NONE;\n    if (arm_deadline(vm) < 0)"
BARE, PLUGGED = "sidecar (bare)", "sidecar (rate-limit + auth)"


def copy_tree(dest: Path) -> None:
    """This tree's tracked files, as they are now, under `dest`, and its built plugins
    (linked), which the benches look for in `build/plugins`."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    link = dest / "build/plugins"
    link.parent.mkdir(exist_ok=True)
    if not link.is_symlink():  # a kept copy built again
        link.symlink_to(REPO / "build/plugins")


def without_guest_calls(tree: Path) -> None:
    driver = tree / DRIVER
    text = driver.read_text()
    if text.count(NO_EXPORT) != 1:
        raise SystemExit(f"{DRIVER}: vm_call's first lines changed; update NO_EXPORT here")
    driver.write_text(text.replace(NO_EXPORT, NO_CALL))


def build(tree: Path) -> None:
    """The copy's crossings, profile-guided; the training run must import the copy."""
    plugins = REPO / "build/plugins"
    if not (plugins / "rate_limit.wasm").is_file():
        raise SystemExit("build/plugins has no plugins: run `make setup` first")
    subprocess.run([PY, "setup.py", "-q", "build_pgo", "--plugins", str(plugins)], cwd=tree,
                   env={**os.environ, "PYTHONPATH": str(tree)}, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--pin", action="store_true",
                        help="the sidecars on CPU 0, wrk and the upstream on the others")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="build the copy in DIR (empty or new) and leave it there")
    args = parser.parse_args()
    tree = args.keep or Path(tempfile.mkdtemp(prefix="meshgate-bookkeeping-"))
    tree.mkdir(parents=True, exist_ok=True)
    try:
        copy_tree(tree)
        without_guest_calls(tree)
        build(tree)
        results, _, _ = run(args.seconds, args.connections, envoy=False, rounds=args.rounds,
                            compare=tree, pin=args.pin)
    finally:
        if args.keep is None:
            shutil.rmtree(tree, ignore_errors=True)
    bare = results[BARE]["cpu_us"]
    total = cpu_over(results, PLUGGED)
    kept = cpu_over(results, "compare: " + PLUGGED, "compare: " + BARE)
    print(f"wrk -t1 -c{args.connections} -d{args.seconds}s, medians of {args.rounds} "
          "interleaved rounds, CPU µs a request")
    for name, r in results.items():
        print(f"  {name:40} {r['cpu_us']:6.0f}")
    print(f"the two bare listeners (same code): {results['compare: ' + BARE]['cpu_us'] / bare:.2f}")
    print(f"rate-limit + auth by subtraction:   {total:5.1f} µs, {total / bare:.1%} of bare")
    print(f"  the host's bookkeeping (no guest code run): {kept:5.1f} µs, "
          f"{kept / total:.0%} of it")
    print(f"  the callbacks (wasmtime, the guests, host functions, their edits): "
          f"{total - kept:5.1f} µs")


if __name__ == "__main__":
    main()
