"""The WASI preview1 subset proxy-wasm hosts provide (module ``wasi_snapshot_preview1``,
also linked as ``wasi_unstable``): stdout/stderr to the log, clocks, randomness, the VM's
configured environment, and stubs that answer what Envoy's host answers — no filesystem,
no sockets.
"""

from __future__ import annotations

import os
import time
from typing import Protocol

from ._rawcall import HostAbort, HostFunctionTable
from .abi import LogLevel, WasiErrno
from .vm import PluginVM

SUCCESS, BADF, NOSYS, NOTSUP = (int(WasiErrno.SUCCESS), int(WasiErrno.BADF),
                                int(WasiErrno.NOSYS), int(WasiErrno.NOTSUP))
_FILETYPE_CHARACTER_DEVICE = 2


class WasiTarget(Protocol):
    vm: PluginVM
    environment: list[tuple[str, str]]

    def log(self, level: int, message: str) -> None: ...


class ProcExit(HostAbort):
    """The plugin called ``proc_exit``: the VM is finished, like a trap."""

    def __init__(self, code: int) -> None:
        super().__init__(f"proc_exit({code})")
        self.code = code


class WasiImports:

    __slots__ = ("t",)
    def __init__(self, target: WasiTarget) -> None:
        self.t = target

    def fd_write(self, fd: int, iovs: int, iovs_len: int, ret_written: int) -> int:
        mem = self.t.vm.mem
        if fd not in (1, 2):
            return BADF
        chunks = []
        for i in range(iovs_len):
            base = iovs + 8 * i
            chunks.append(mem.read(mem.read_u32(base), mem.read_u32(base + 4)))
        data = b"".join(chunks)
        mem.write_u32(ret_written, len(data))
        message = data.decode("utf-8", "replace").removesuffix("\n")
        self.t.log(LogLevel.INFO if fd == 1 else LogLevel.ERROR, message)
        return SUCCESS

    def clock_time_get(self, clock_id: int, _precision: int, ret_time: int) -> int:
        if clock_id == 0:
            now = time.time_ns()
        elif clock_id == 1:
            now = time.monotonic_ns()
        else:
            return NOTSUP
        self.t.vm.mem.write_u64(ret_time, now)
        return SUCCESS

    def clock_res_get(self, clock_id: int, ret_res: int) -> int:
        if clock_id not in (0, 1):
            return NOTSUP
        self.t.vm.mem.write_u64(ret_res, 1)
        return SUCCESS

    def random_get(self, buf: int, size: int) -> int:
        self.t.vm.mem.write(buf, os.urandom(size))
        return SUCCESS

    def _env_blob(self) -> list[bytes]:
        return [f"{k}={v}".encode() + b"\0" for k, v in self.t.environment]

    def environ_sizes_get(self, ret_count: int, ret_size: int) -> int:
        entries = self._env_blob()
        self.t.vm.mem.write_u32(ret_count, len(entries))
        self.t.vm.mem.write_u32(ret_size, sum(len(e) for e in entries))
        return SUCCESS

    def environ_get(self, ret_array: int, ret_buf: int) -> int:
        mem = self.t.vm.mem
        pos = ret_buf
        for i, entry in enumerate(self._env_blob()):
            mem.write_u32(ret_array + 4 * i, pos)
            mem.write(pos, entry)
            pos += len(entry)
        return SUCCESS

    def args_sizes_get(self, ret_argc: int, ret_size: int) -> int:
        self.t.vm.mem.write_u32(ret_argc, 0)
        self.t.vm.mem.write_u32(ret_size, 0)
        return SUCCESS

    def args_get(self, _argv: int, _buf: int) -> int:
        return SUCCESS

    def proc_exit(self, code: int) -> None:
        raise ProcExit(code)

    def sched_yield(self) -> int:
        return SUCCESS

    def poll_oneoff(self, _in: int, _out: int, _n: int, ret_nevents: int) -> int:
        self.t.vm.mem.write_u32(ret_nevents, 0)
        return NOSYS

    def fd_fdstat_get(self, fd: int, ret_stat: int) -> int:
        if fd not in (1, 2):
            return BADF
        # fdstat: u8 filetype, u16 flags, u64 rights_base, u64 rights_inheriting (24 bytes)
        stat = bytearray(24)
        stat[0] = _FILETYPE_CHARACTER_DEVICE
        self.t.vm.mem.write(ret_stat, bytes(stat))
        return SUCCESS

    def fd_prestat_get(self, _fd: int, _ret: int) -> int:
        return BADF  # no preopened directories: ends wasi-libc's preopen scan

    def fd_unsupported(self, *_args: int) -> int:
        return NOSYS


# (name, params, results, implementation attribute)
WASI_SIGNATURES: list[tuple[str, str, str, str]] = [
    ("fd_write", "iiii", "i", "fd_write"),
    ("clock_time_get", "iIi", "i", "clock_time_get"),
    ("clock_res_get", "ii", "i", "clock_res_get"),
    ("random_get", "ii", "i", "random_get"),
    ("environ_sizes_get", "ii", "i", "environ_sizes_get"),
    ("environ_get", "ii", "i", "environ_get"),
    ("args_sizes_get", "ii", "i", "args_sizes_get"),
    ("args_get", "ii", "i", "args_get"),
    ("proc_exit", "i", "", "proc_exit"),
    ("sched_yield", "", "i", "sched_yield"),
    ("poll_oneoff", "iiii", "i", "poll_oneoff"),
    ("fd_fdstat_get", "ii", "i", "fd_fdstat_get"),
    ("fd_prestat_get", "ii", "i", "fd_prestat_get"),
    ("fd_read", "iiii", "i", "fd_unsupported"),
    ("fd_close", "i", "i", "fd_unsupported"),
    ("fd_seek", "iIii", "i", "fd_unsupported"),
    ("fd_fdstat_set_flags", "ii", "i", "fd_unsupported"),
    ("fd_prestat_dir_name", "iii", "i", "fd_unsupported"),
    ("path_open", "iiiiiIIii", "i", "fd_unsupported"),
    ("path_filestat_get", "iiiii", "i", "fd_unsupported"),
    ("fd_filestat_get", "ii", "i", "fd_unsupported"),
]


def define_wasi(table: HostFunctionTable, wasi: WasiImports) -> None:
    for module in ("wasi_snapshot_preview1", "wasi_unstable"):
        for name, params, results, attr in WASI_SIGNATURES:
            table.define(module, name, params, results, getattr(wasi, attr),
                         on_bad_memory=int(WasiErrno.FAULT))
