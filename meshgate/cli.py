"""The `meshgate` command: wires the parts together, holds no logic of its own."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import urllib.error
import urllib.request
from pathlib import Path

from meshgate.status_table import render_status
from meshgate.xds.bootstrap import envoy_bootstrap
from meshgate.xds.config import ConfigError, MeshConfig, load_default, load_file


def _load(path: str | None) -> MeshConfig:
    return load_file(Path(path)) if path else load_default()


def _serve(args: argparse.Namespace) -> int:
    from meshgate.xds.server import ControlServer, ServerAddress

    async def main() -> None:
        address = ServerAddress(args.host, args.xds_port, args.http_port, args.advertise_host)
        server = ControlServer(_load(args.config), address,
                               Path(args.config) if args.config else None)
        await server.start()
        print(f"meshgate control server: xds {args.host}:{args.xds_port}, "
              f"http {args.host}:{args.http_port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    asyncio.run(main())
    return 0


def _up(args: argparse.Namespace) -> int:
    from meshgate.stack import StackPorts, run_stack

    asyncio.run(run_stack(_load(args.config), Path(args.config) if args.config else None,
                          StackPorts(), delta=args.delta))
    return 0


def _validate(args: argparse.Namespace) -> int:
    config = _load(args.config)
    print(f"{config.source}: ok ({len(config.listeners)} listeners, {len(config.clusters)} "
          f"clusters, {len(config.plugins)} plugins)")
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    print(json.dumps(envoy_bootstrap(node_id=args.node_id, node_cluster=args.cluster,
                                     xds_host=args.xds_host, xds_port=args.xds_port,
                                     admin_port=args.admin_port, delta=args.delta), indent=2))
    return 0


def _status(args: argparse.Namespace) -> int:
    url = args.server.rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status = json.load(response)
    except (urllib.error.URLError, OSError) as exc:
        print(f"meshgate status: cannot reach the control server at {url}: {exc}",
              file=sys.stderr)
        return 2
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshgate", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the local stack in the foreground")
    up.add_argument("--config", help="meshgate.yaml (default: the embedded demo config)")
    up.add_argument("--delta", action="store_true", help="Envoy uses incremental xDS")
    up.set_defaults(func=_up)

    serve = sub.add_parser("serve", help="run the xDS control server")
    serve.add_argument("--config", help="meshgate.yaml, watched for changes")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--xds-port", type=int, default=18000)
    serve.add_argument("--http-port", type=int, default=18001)
    serve.add_argument("--advertise-host", default="",
                       help="IP address proxies use to fetch plugin binaries "
                            "(default: --host; set it when binding 0.0.0.0)")
    serve.set_defaults(func=_serve)

    validate = sub.add_parser("validate", help="check a config file and exit")
    validate.add_argument("--config", help="meshgate.yaml")
    validate.set_defaults(func=_validate)

    boot = sub.add_parser("bootstrap", help="print an Envoy bootstrap that uses meshgate")
    boot.add_argument("--node-id", required=True)
    boot.add_argument("--cluster", default="envoy")
    boot.add_argument("--xds-host", default="127.0.0.1")
    boot.add_argument("--xds-port", type=int, default=18000)
    boot.add_argument("--admin-port", type=int, default=19901)
    boot.add_argument("--delta", action="store_true")
    boot.set_defaults(func=_bootstrap)

    sub.add_parser("sidecar", help="run meshgate's sidecar, configured over xDS "
                                    "(see `meshgate sidecar --help`)")

    status = sub.add_parser("status", help="per-proxy xDS sync state, like istioctl "
                                           "proxy-status")
    status.add_argument("--server", default="http://127.0.0.1:18001")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sidecar"]:
        from meshgate.gateway.app import main as sidecar_main

        return sidecar_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"meshgate: invalid config: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
