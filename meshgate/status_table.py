"""Text rendering of the control server's status, like `istioctl proxy-status`."""

from __future__ import annotations

from typing import Any

TYPES = ("CDS", "EDS", "LDS", "RDS", "ECDS")


def _cell(state: dict[str, Any] | None) -> str:
    if state is None:
        return "-"
    version = state["version_acked"] or state["version_sent"]
    return f"{state['state']} {version[:8]}" if version else state["state"]


def render_status(status: dict[str, Any]) -> str:
    config = status["config"]
    lines = [f"config: {config['source']} (generation {config['generation']})"]
    if config.get("last_rejected"):
        lines.append(f"last rejected change: {config['last_rejected']['error']}")
    header = ["NODE", "CLUSTER", "XDS", *TYPES]
    rows = [header]
    nacks = []
    for proxy in status["proxies"]:
        types = proxy["types"]
        rows.append([proxy["node_id"], proxy["cluster"], proxy["xds"],
                     *(_cell(types.get(t)) for t in TYPES)])
        for name, state in types.items():
            if "last_nack" in state:
                nack = state["last_nack"]
                nacks.append(f"{proxy['node_id']} {name} NACK of {nack['version'][:8]}: "
                             f"{nack['error']}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    if len(rows) == 1:
        lines.append("(no proxies connected)")
    if nacks:
        lines += ["", "last NACKs:", *nacks]
    return "\n".join(lines)
