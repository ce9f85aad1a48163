from __future__ import annotations

from pathlib import Path

import pytest

from meshgate.xds.config import ConfigError, from_dict, load_default, load_text


def base() -> dict:
    return {
        "listeners": [{"name": "ingress", "port": 10000,
                       "routes": [{"prefix": "/", "cluster": "web", "timeout": "250ms"}]}],
        "clusters": [{"name": "web", "endpoints": ["127.0.0.1:8080"]}],
    }


def load(raw: dict, tmp_path: Path = Path(".")) -> object:
    return from_dict(raw, source="meshgate.yaml", base_dir=tmp_path)


def test_embedded_default_is_valid() -> None:
    config = load_default()
    assert [ls.name for ls in config.listeners] == ["ingress"]


def test_durations_and_endpoints_are_resolved() -> None:
    config = load(base())
    assert config.listeners[0].routes[0].timeout_s == 0.25
    assert config.clusters[0].endpoints[0].port == 8080


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["listeners"][0].update(port=0),
         "meshgate.yaml: listeners[0].port: 0 is less than the minimum of 1"),
        (lambda c: c["listeners"][0]["routes"][0].update(cluster="nope"),
         "listeners[0].routes[0].cluster: no cluster named 'nope'"),
        (lambda c: c["listeners"][0]["routes"][0].update(timeout="5 sec"),
         "listeners[0].routes[0].timeout: '5 sec' does not match"),
        (lambda c: c["clusters"].append({"name": "web", "endpoints": ["h:1"]}),
         "clusters: name 'web' is used more than once"),
        (lambda c: c["clusters"][0].update(endpoints=["no-port"]),
         "clusters[0].endpoints[0]: 'no-port' does not match"),
        (lambda c: c["listeners"][0].update(plugins=["auth"]),
         "listeners[0].plugins[0]: no plugin named 'auth'"),
        (lambda c: c.update(nodes=[{"listeners": ["ingress"]}]),
         "nodes[0]: give 'id' or 'cluster'"),
        (lambda c: c.update(surprise=1),
         "Additional properties are not allowed ('surprise' was unexpected)"),
        (lambda c: c["listeners"][0]["routes"][0].update(path="/x"),
         "listeners[0].routes[0]: give exactly one of 'prefix' or 'path'"),
    ],
)
def test_bad_config_names_field_and_reason(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    raw = base()
    mutate(raw)
    with pytest.raises(ConfigError) as err:
        load(raw)
    assert message in str(err.value)


def test_plugin_binary_must_exist_and_be_wasm(tmp_path: Path) -> None:
    raw = base()
    raw["plugins"] = [{"name": "auth", "wasm": "auth.wasm"}]
    with pytest.raises(ConfigError, match=r"plugins\[0\].wasm: cannot read .*auth.wasm"):
        load(raw, tmp_path)
    (tmp_path / "auth.wasm").write_bytes(b"MZ not wasm")
    with pytest.raises(ConfigError, match="is not a WebAssembly binary"):
        load(raw, tmp_path)
    (tmp_path / "auth.wasm").write_bytes(b"\0asm\x01\0\0\0")
    plugin = load(raw, tmp_path).plugins[0]  # type: ignore[attr-defined]
    assert plugin.sha256 == "93a44bbb96c751218e4c00d479e4c14358122a389acca16205b1e4d0dc5f9476"
    assert (plugin.root_id, plugin.vm_id, plugin.fail_open, plugin.configuration) == (
        "auth", "auth", False, "{}")


def test_yaml_syntax_error_names_line() -> None:
    with pytest.raises(ConfigError, match=r"x.yaml:3:1: not valid YAML: expected"):
        load_text("listeners:\n  - [unclosed\n", source="x.yaml", base_dir=Path("."))
