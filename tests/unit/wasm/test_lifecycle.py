"""Stream lifecycle, pausing, local replies, http_call, ticks and every failure mode."""

from __future__ import annotations

import asyncio
import logging

import pytest
import wasmtime

from meshgate.gateway.wasm import (
    CONTINUE,
    STOP_AND_BUFFER,
    HeaderMap,
    HostServices,
    LocalReply,
    PluginHost,
    PluginLoadError,
    PluginSpec,
)
from meshgate.gateway.wasm.abi import serialize_pairs
from meshgate.gateway.wasm.services import ENGINE_FINGERPRINT, cpu_features, engine_fingerprint

from .wat import plugin


def req() -> HeaderMap:
    return HeaderMap([(":method", "GET"), (":path", "/"), (":authority", "svc"),
                      (":scheme", "http")])


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=1)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def plugin_log():
    rec = Recorder()
    logger = logging.getLogger("meshgate.plugin")
    logger.addHandler(rec)
    old = logger.level
    logger.setLevel(1)
    yield rec.messages
    logger.removeHandler(rec)
    logger.setLevel(old)


def log_snippet(name: str) -> str:
    return f"(drop (call $proxy_log (i32.const 2) @{name} #{name}))"


# -- order of callbacks -------------------------------------------------------------------
async def test_callback_order_matches_envoy(load, plugin_log):
    names = ["create", "reqh", "reqb", "resph", "respb", "log", "done", "delete"]
    wat = plugin(strings={n: n.encode() for n in names},
                 on_context_create="(if (i32.ne (local.get $ctx) (i32.const 1)) (then "
                                   + log_snippet("create") + "))",
                 on_request_headers=log_snippet("reqh") + "(i32.const 0)",
                 on_request_body=log_snippet("reqb") + "(i32.const 0)",
                 on_response_headers=log_snippet("resph") + "(i32.const 0)",
                 on_response_body=log_snippet("respb") + "(i32.const 0)",
                 on_log=log_snippet("log"), on_done=log_snippet("done") + "(i32.const 1)",
                 on_delete=log_snippet("delete"))
    host = await load(wat)
    stream = host.new_stream()
    assert await stream.request_headers(req(), False) == CONTINUE
    assert await stream.request_body(bytearray(b"abc"), True) == CONTINUE
    assert await stream.response_headers(HeaderMap([(":status", "200")]), False) == CONTINUE
    assert await stream.response_body(bytearray(b""), True) == CONTINUE
    stream.finish()
    assert plugin_log == names


async def test_stream_context_ids_increase_from_two(load):
    host = await load(plugin())
    assert [host.new_stream().context_id for _ in range(3)] == [2, 3, 4]


# -- headers edited in place, local reply ---------------------------------------------------
async def test_plugin_adds_request_header_in_place(load):
    wat = plugin(strings={"k": b"x-added", "v": b"yes"},
                 on_request_headers="""(drop (call $proxy_add_header_map_value (i32.const 0)
                    @k #k @v #v)) (i32.const 0)""")
    host = await load(wat)
    headers = req()
    assert await host.new_stream().request_headers(headers, True) == CONTINUE
    assert headers.get("x-added") == "yes"


LOCAL_REPLY = """
  (drop (call $proxy_send_local_response (i32.const 403) @details #details @body #body
         @hdrs #hdrs (i32.const -1)))
  (i32.const 1)"""


async def test_local_reply_runs_response_callbacks_over_the_reply(load):
    hdrs = serialize_pairs([(b"x-denied", b"1")])
    wat = plugin(strings={"details": b"denied_by_probe", "body": b"forbidden", "hdrs": hdrs,
                          "k": b"x-seen-by-response", "v": b"yes"},
                 on_request_headers=LOCAL_REPLY,
                 on_response_headers="""(drop (call $proxy_add_header_map_value (i32.const 2)
                    @k #k @v #v)) (i32.const 0)""")
    host = await load(wat)
    stream = host.new_stream()
    action = await stream.request_headers(req(), False)
    assert action == LocalReply(403, [("x-denied", "1"), ("content-type", "text/plain"),
                                      ("x-seen-by-response", "yes")], b"forbidden",
                                "denied_by_probe")
    # the data path may still call; nothing more reaches the plugin
    assert await stream.request_body(bytearray(b"x"), True) == CONTINUE
    stream.finish()


async def test_body_pause_before_end_means_buffer(load):
    host = await load(plugin(on_request_body="(i32.const 1)"))
    stream = host.new_stream()
    await stream.request_headers(req(), False)
    assert await stream.request_body(bytearray(b"part"), False) == STOP_AND_BUFFER


async def test_body_rewrite_is_visible_to_the_data_path(load):
    wat = plugin(strings={"new": b"REPLACED"}, on_request_body="""
        (drop (call $proxy_set_buffer_bytes (i32.const 0) (i32.const 0) (local.get $n)
               @new #new)) (i32.const 0)""")
    host = await load(wat)
    stream = host.new_stream()
    await stream.request_headers(req(), False)
    body = bytearray(b"original body")
    assert await stream.request_body(body, True) == CONTINUE
    assert body == b"REPLACED"


# -- http_call: pause, response on the root context, resume ----------------------------------
HTTP_CALL = """
  (drop (call $proxy_http_call @cluster #cluster @hdrs #hdrs (i32.const 0) (i32.const 0)
         (i32.const 0) (i32.const 0) (i32.const 5000) (i32.const 200)))
  (i32.store (i32.const 204) (local.get $ctx))
  (i32.const 1)"""

ON_RESPONSE_CONTINUE = """
  (if (i32.ne (local.get $ctx) (i32.const 1)) (then unreachable))
  (drop (call $proxy_set_effective_context (i32.load (i32.const 204))))
  (drop (call $proxy_continue_stream (i32.const 0)))"""

ON_RESPONSE_DENY = """
  (drop (call $proxy_set_effective_context (i32.load (i32.const 204))))
  (drop (call $proxy_get_buffer_bytes (i32.const 4) (i32.const 0) (local.get $body)
         (i32.const 0) (i32.const 4)))
  (drop (call $proxy_send_local_response (i32.const 401) @details #details
         (i32.load (i32.const 0)) (i32.load (i32.const 4)) @nohdrs #nohdrs (i32.const -1)))"""


class FakeDispatcher:
    def __init__(self, reply=None, delay: float = 0.0, fail: bool = False) -> None:
        self.calls: list[tuple] = []
        self.reply = reply or ([(":status", "200")], b"ok", [])
        self.delay = delay
        self.fail = fail

    def has_cluster(self, name: str) -> bool:
        return name == "authz"

    async def __call__(self, cluster, headers, body, trailers, timeout_s):
        self.calls.append((cluster, headers, body, trailers, timeout_s))
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ConnectionRefusedError("nope")
        return self.reply


def call_plugin(on_response: str) -> str:
    hdrs = serialize_pairs([(b":method", b"GET"), (b":path", b"/check"),
                            (b":authority", b"authz")])
    return plugin(strings={"cluster": b"authz", "hdrs": hdrs, "details": b"authz_denied",
                           "nohdrs": serialize_pairs([])},
                  on_request_headers=HTTP_CALL, on_http_call_response=on_response)


async def test_paused_stream_resumes_when_the_call_returns(load, services):
    dispatcher = FakeDispatcher(delay=0.01)
    services.http_dispatcher = dispatcher
    host = await load(call_plugin(ON_RESPONSE_CONTINUE))
    action = await host.new_stream().request_headers(req(), True)
    assert action == CONTINUE
    cluster, headers, _body, _trailers, timeout_s = dispatcher.calls[0]
    assert (cluster, headers[1], timeout_s) == ("authz", (":path", "/check"), 5.0)


async def test_begin_answers_at_once_or_none_until_resumed(load, services):
    # The data path's entry: no coroutine unless the plugin pauses.
    services.http_dispatcher = FakeDispatcher(delay=0.01)
    host = await load(call_plugin(ON_RESPONSE_CONTINUE))
    stream = host.new_stream()
    assert stream.begin_request_headers(req(), True) is None  # paused on its http_call
    assert await stream.resumed() == CONTINUE
    assert stream.begin_response_headers(HeaderMap([(":status", "200")]), False) == CONTINUE


async def test_call_response_body_drives_a_local_reply(load, services):
    services.http_dispatcher = FakeDispatcher(reply=([(":status", "403")], b"no token", []))
    host = await load(call_plugin(ON_RESPONSE_DENY))
    action = await host.new_stream().request_headers(req(), True)
    assert isinstance(action, LocalReply)
    assert (action.status, action.body, action.details) == (401, b"no token", "authz_denied")


async def test_unreachable_upstream_is_delivered_as_envoys_503(load, services):
    services.http_dispatcher = FakeDispatcher(fail=True)
    host = await load(call_plugin(ON_RESPONSE_DENY))
    action = await host.new_stream().request_headers(req(), True)
    assert isinstance(action, LocalReply)
    assert action.body.startswith(b"upstream connect error")


async def test_pause_without_resume_times_out(load, services):
    services.pause_timeout_s = 0.05
    host = await load(plugin(on_request_headers="(i32.const 1)"))
    action = await host.new_stream().request_headers(req(), True)
    assert isinstance(action, LocalReply) and action.status == 504


# -- ticks --------------------------------------------------------------------------------
async def test_ticks_run_until_close(load, plugin_log):
    wat = plugin(strings={"tick": b"tick"},
                 on_configure="(drop (call $proxy_set_tick_period_milliseconds (i32.const 10)))"
                              "(i32.const 1)",
                 on_tick=log_snippet("tick"))
    host = await load(wat)
    await asyncio.sleep(0.08)
    await host.close()
    ticks = plugin_log.count("tick")
    assert ticks >= 3
    await asyncio.sleep(0.05)
    assert plugin_log.count("tick") == ticks


# -- failure containment ------------------------------------------------------------------
TRAP_ON_PATH = """
  (drop (call $proxy_get_header_map_value (i32.const 0) @p #p (i32.const 0) (i32.const 4)))
  (if (i32.eq (i32.load8_u offset=1 (i32.load (i32.const 0))) (i32.const 0x62))
      (then unreachable))
  (i32.const 0)"""  # traps when :path starts with '/b'


def trap_plugin() -> str:
    return plugin(strings={"p": b":path"}, on_request_headers=TRAP_ON_PATH)


def path(p: str) -> HeaderMap:
    return HeaderMap([(":method", "GET"), (":path", p)])


async def test_trap_fails_closed_and_the_vm_is_recreated(load, caplog):
    caplog.set_level(logging.INFO, logger="meshgate.gateway.wasm")
    host = await load(trap_plugin(), name="auth")
    action = await host.new_stream().request_headers(path("/bad"), True)
    assert action == LocalReply(503, [], b"", "wasm_fail_stream")
    trap_lines = [r.getMessage() for r in caplog.records if "trapped" in r.getMessage()]
    assert len(trap_lines) == 1
    assert trap_lines[0].startswith(
        f"plugin 'auth' (sha256 {host.spec.sha256[:12]}) trapped in proxy_on_request_headers:")
    assert "unreachable" in trap_lines[0]
    assert await host.new_stream().request_headers(path("/good"), True) == CONTINUE


async def test_trap_fails_open_when_configured(load):
    host = await load(trap_plugin(), fail_open=True)
    stream = host.new_stream()
    assert await stream.request_headers(path("/bad"), False) == CONTINUE
    assert await stream.request_body(bytearray(b"x"), True) == CONTINUE  # plugin skipped
    stream.finish()
    assert await host.new_stream().request_headers(path("/good"), True) == CONTINUE


async def test_other_streams_on_a_trapped_vm_apply_the_policy(load):
    host = await load(trap_plugin())
    survivor = host.new_stream()
    await survivor.request_headers(path("/ok"), False)
    await host.new_stream().request_headers(path("/bad"), True)
    action = await survivor.response_headers(HeaderMap([(":status", "200")]), True)
    assert action == LocalReply(503, [], b"", "wasm_fail_stream")


async def test_a_stream_not_yet_called_when_another_traps_runs_on_the_new_vm(load):
    # The data path opens a batched request's streams a loop pass before their first
    # callback (decision 3100): a trap in between, in another request, must not fail it.
    host = await load(trap_plugin())
    waiting = host.new_stream()
    bad = await host.new_stream().request_headers(path("/bad"), True)
    assert bad == LocalReply(503, [], b"", "wasm_fail_stream")
    assert await waiting.request_headers(path("/good"), True) == CONTINUE
    fresh = host.new_stream()
    # Numbered on the new VM, as a stream opened after the trap: no two share an id.
    assert fresh.context_id != waiting.context_id
    assert set(host.streams) == {waiting.context_id, fresh.context_id}
    assert await fresh.request_headers(path("/good"), True) == CONTINUE
    waiting.finish()
    fresh.finish()
    assert not host.streams


async def test_infinite_loop_hits_the_cpu_deadline(load, caplog):
    host = await load(plugin(on_request_headers="(loop $l (br $l)) (i32.const 0)"))
    action = await host.new_stream().request_headers(req(), True)
    assert action == LocalReply(503, [], b"", "wasm_fail_stream")
    assert any("interrupt" in r.getMessage() for r in caplog.records)


async def test_a_callback_after_the_last_deadline_passed_gets_its_own(load):
    """The deadline counts from each callback's start: once the clock has ticked past the
    previous callback's deadline (0.2 s here), the next callback is armed anew, not trapped
    on entry. The compiled driver arms it in C, the Python one through the VM."""
    host = await load(plugin())
    assert await host.new_stream().request_headers(req(), True) == CONTINUE
    armed_at = host.vm._armed_at
    await asyncio.sleep(0.35)
    assert await host.new_stream().request_headers(req(), True) == CONTINUE
    assert host.vm._armed_at > armed_at + 10  # the clock's ticks at the second arming


async def test_memory_cap_stops_a_growing_plugin(load, services):
    services.memory_limit_bytes = 4 * 65536
    grow = "(if (i32.eq (memory.grow (i32.const 64)) (i32.const -1)) (then unreachable))"
    host = await load(plugin(on_request_headers=grow + "(i32.const 0)"))
    action = await host.new_stream().request_headers(req(), True)
    assert isinstance(action, LocalReply) and action.status == 503


async def test_huge_allocation_past_the_cap_is_invalid_memory_not_a_crash(load, services):
    services.memory_limit_bytes = 4 * 65536
    host = await load(plugin())
    stream = host.new_stream()
    stream.ctx.request_headers = HeaderMap([("x-big", "v" * (1 << 20))])
    key = (600, 5)
    host.vm.mem.write(600, b"x-big")
    status = host._invoke(stream.ctx, "call_proxy_get_header_map_value", 0, *key, 0, 4)
    assert status == 6  # the allocator returned NULL: INVALID_MEMORY_ACCESS


# -- load errors --------------------------------------------------------------------------
async def test_bad_binary(services):
    with pytest.raises(PluginLoadError, match=r"plugin 'junk' \(sha256 [0-9a-f]{12}\): not a"):
        await PluginHost.create(PluginSpec("junk", b"\0asm garbage"), services)


async def test_missing_abi_marker(load):
    with pytest.raises(PluginLoadError, match="Missing or unknown Proxy-Wasm ABI version"):
        await load(plugin(abi_marker=""))


async def test_unknown_import(services):
    wasm = wasmtime.wat2wasm('(module (import "env" "proxy_teleport" (func)) '
                             '(memory (export "memory") 1) '
                             '(func (export "proxy_abi_version_0_2_1")))')
    with pytest.raises(PluginLoadError, match="unknown import env.proxy_teleport"):
        await PluginHost.create(PluginSpec("odd", bytes(wasm)), services)


async def test_on_configure_false(load):
    with pytest.raises(PluginLoadError, match="proxy_on_configure returned false"):
        await load(plugin(on_configure="(i32.const 0)"))


async def test_trap_during_start(load):
    with pytest.raises(PluginLoadError, match="trapped while starting"):
        await load(plugin(initialize="unreachable"))


# -- module cache -------------------------------------------------------------------------
async def test_a_binary_already_loaded_is_reused_from_memory(load, services, tmp_path):
    # A configuration-only push: the module comes from memory, not from the disk.
    await load(plugin(), name="a")
    for entry in (tmp_path / "modules").iterdir():
        entry.unlink()
    again = await load(plugin(), name="a-reconfigured")
    assert again.module_from_cache
    assert await again.new_stream().request_headers(req(), True) == CONTINUE
    services.module_cache.forget()  # nothing on disk, nothing in memory: compiled again
    assert not (await load(plugin(), name="a-fresh")).module_from_cache


async def test_second_load_comes_from_the_module_cache(load):
    first = await load(plugin(), name="a")
    second = await load(plugin(), name="b")
    assert (first.module_from_cache, second.module_from_cache) == (False, True)
    assert await second.new_stream().request_headers(req(), True) == CONTINUE


async def test_cached_modules_are_filed_under_this_cpus_features(load, tmp_path):
    # Sidecars on other CPUs sharing the directory write files of their own: wasmtime
    # would refuse a module compiled for features this CPU lacks.
    await load(plugin(), name="a")
    names = [entry.name for entry in (tmp_path / "modules").iterdir()]
    assert names and all(n.endswith(f"-{ENGINE_FINGERPRINT}.cwasm") for n in names)
    assert engine_fingerprint(cpu_features()) == ENGINE_FINGERPRINT
    assert engine_fingerprint("avx2 sse4_2") != engine_fingerprint("avx2 avx512f sse4_2")


async def test_an_unwritable_module_cache_costs_a_compile_not_the_plugin(tmp_path, caplog):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the cache directory should be")
    services = HostServices(module_cache_dir=blocked, callback_deadline_s=0.2)
    try:
        with caplog.at_level(logging.WARNING, logger="meshgate.gateway.wasm"):
            host = await PluginHost.create(PluginSpec("a", bytes(wasmtime.wat2wasm(plugin()))),
                                           services)
        assert await host.new_stream().request_headers(req(), True) == CONTINUE
        assert any("module cache" in m and "not writable" in m for m in caplog.messages)
        assert blocked.read_text().startswith("a file")
        await host.close()
    finally:
        services.close()


def test_cpu_features_read_from_proc_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: sse2 avx2 fpu\n\nprocessor\t: 1\nflags\t: other\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd aes\n")
    assert cpu_features(x86) == "avx2 fpu sse2"  # the first CPU's, sorted
    assert cpu_features(arm) == "aes asimd fp"
    assert cpu_features(tmp_path / "missing") == ""
