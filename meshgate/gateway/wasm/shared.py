"""Process-wide state plugins share: key-value data with CAS, and shared queues.

Both are keyed by ``vm_id`` as in Envoy: every VM (of any plugin) configured with the same
vm_id sees the same keys and can resolve the same queues.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .abi import Status


class SharedDataStore:
    """Shared key-value data with compare-and-swap.

    CAS values come from one counter for the whole store, start at 1 and skip 0 when the
    counter wraps, as in proxy-wasm-cpp-host: 0 in a set means "unconditional".
    """

    __slots__ = ("_data", "_next_cas")

    def __init__(self) -> None:
        self._data: dict[tuple[str, bytes], tuple[bytes, int]] = {}
        self._next_cas = 1

    def _take_cas(self) -> int:
        cas = self._next_cas
        self._next_cas = (self._next_cas + 1) & 0xFFFFFFFF or 1
        return cas

    def get(self, vm_id: str, key: bytes) -> tuple[bytes, int] | None:
        return self._data.get((vm_id, key))

    def set(self, vm_id: str, key: bytes, value: bytes, cas: int) -> Status:
        current = self._data.get((vm_id, key))
        if current is not None and cas and cas != current[1]:
            return Status.CAS_MISMATCH
        self._data[(vm_id, key)] = (bytes(value), self._take_cas())
        return Status.OK


QueueReadyCallback = Callable[[int], None]


@dataclass
class _Queue:
    vm_id: str
    name: bytes
    on_ready: QueueReadyCallback
    items: deque[bytes] = field(default_factory=deque)


class SharedQueues:
    """Named queues: one plugin registers (and is told when items arrive), others enqueue.

    ``on_ready`` is called with the queue id after each enqueue; the plugin host schedules
    ``proxy_on_queue_ready`` from it rather than re-entering a VM synchronously.
    """

    def __init__(self) -> None:
        self._by_name: dict[tuple[str, bytes], int] = {}
        self._queues: dict[int, _Queue] = {}
        self._next_id = 1

    def register(self, vm_id: str, name: bytes, on_ready: QueueReadyCallback) -> int:
        """Register (or re-register, e.g. from a recreated VM) and return the queue id."""
        qid = self._by_name.get((vm_id, name))
        if qid is not None:
            self._queues[qid].on_ready = on_ready
            return qid
        qid = self._next_id
        self._next_id += 1
        self._by_name[(vm_id, name)] = qid
        self._queues[qid] = _Queue(vm_id, name, on_ready)
        return qid

    def resolve(self, vm_id: str, name: bytes) -> int | None:
        return self._by_name.get((vm_id, name))

    def enqueue(self, qid: int, value: bytes) -> Status:
        queue = self._queues.get(qid)
        if queue is None:
            return Status.NOT_FOUND
        queue.items.append(bytes(value))
        queue.on_ready(qid)
        return Status.OK

    def dequeue(self, qid: int) -> tuple[Status, bytes]:
        queue = self._queues.get(qid)
        if queue is None:
            return Status.NOT_FOUND, b""
        if not queue.items:
            return Status.EMPTY, b""
        return Status.OK, queue.items.popleft()
