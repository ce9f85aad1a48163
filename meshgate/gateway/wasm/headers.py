"""``HeaderMap`` and ``LiveHeaderMap``: the ordered multimaps a stream's headers and trailers
live in."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from multidict import CIMultiDict


class _Lookups:
    """What both header maps derive from ``get`` and ``get_all``."""

    __slots__ = ()

    def get(self, name: str) -> str | None:
        raise NotImplementedError

    def get_all(self, name: str) -> list[str]:
        raise NotImplementedError

    def joined(self, name: str) -> str | None:
        """All values of ``name`` joined with ``,`` as Envoy's ``getHeaderMapValue`` does."""
        values = self.get_all(name)
        return ",".join(values) if values else None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None


class HeaderMap(_Lookups):
    """Ordered multimap of header names to values, pseudo-headers (``:path``...) included.

    Names are stored lower-cased (HTTP/2 and Envoy normalise them so); lookups are
    case-insensitive. The plugin mutates it in place through the host. It holds what the
    data path does not: trailers, an HTTP call's response; a request's and a response's
    headers are a ``LiveHeaderMap``, which answers the same.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = [(k.lower(), v) for k, v in items]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HeaderMap) and self._items == other._items

    def __repr__(self) -> str:
        return f"HeaderMap({self._items!r})"

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def get(self, name: str) -> str | None:
        """First value of ``name``, or None."""
        name = name.lower()
        for k, v in self._items:
            if k == name:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self._items if k == name]

    def add(self, name: str, value: str) -> None:
        self._items.append((name.lower(), value))

    def set(self, name: str, value: str) -> None:
        """Replace every value of ``name`` with one value (appended if absent)."""
        name = name.lower()
        items = self._items
        for i, (k, _) in enumerate(items):
            if k == name:
                items[i] = (k, value)
                # Rebuild only if a later duplicate exists (rare): plugins set a few
                # headers on every request.
                for j in range(i + 1, len(items)):
                    if items[j][0] == name:
                        self._items = items[:i + 1] + [kv for kv in items[i + 1:]
                                                       if kv[0] != name]
                        break
                return
        items.append((name, value))

    def remove(self, name: str) -> None:
        name = name.lower()
        self._items = [kv for kv in self._items if kv[0] != name]

    def replace_all(self, items: Iterable[tuple[str, str]]) -> None:
        self._items = [(k.lower(), v) for k, v in items]


class LiveHeaderMap(_Lookups):
    """A request's or response's headers as its plugins see them: the pseudo-headers
    (``:path``...) in a list of their own, then the data path's ``CIMultiDict``, which
    the plugins' edits change in place (decision 2500).

    It answers as a ``HeaderMap`` built from the same headers would, edit for edit (a set
    replaces the first value in place and drops the others, as ``CIMultiDict`` does), with
    names lower-cased on the way out, and pseudo-headers always first, as in Envoy's own
    header maps. Nothing is copied to show a phase to its plugins, and nothing is written
    back after it. ``touched`` says whether an edit named a pseudo-header: only then does
    the data path read ``:path`` or ``:status`` back.
    """

    __slots__ = ("pseudo", "headers", "touched")

    def __init__(self, pseudo: list[tuple[str, str]] | None = None,
                 headers: Any = None) -> None:
        self.pseudo: list[tuple[str, str]] = pseudo if pseudo is not None else []
        self.headers: Any = headers if headers is not None else CIMultiDict()
        self.touched = False

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.items())

    def __len__(self) -> int:
        return len(self.pseudo) + len(self.headers)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (HeaderMap, LiveHeaderMap)) and self.items() == other.items()

    def __repr__(self) -> str:
        return f"LiveHeaderMap({self.items()!r})"

    def items(self) -> list[tuple[str, str]]:
        return [*self.pseudo, *[(k.lower(), v) for k, v in self.headers.items()]]

    def get(self, name: str) -> str | None:
        """First value of ``name``, or None."""
        name = name.lower()
        if name[:1] != ":":
            return self.headers.get(name)  # type: ignore[no-any-return]
        for k, v in self.pseudo:
            if k == name:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        if name[:1] != ":":
            return list(self.headers.getall(name, ()))
        return [v for k, v in self.pseudo if k == name]

    def add(self, name: str, value: str) -> None:
        name = name.lower()
        if name[:1] != ":":
            self.headers.add(name, value)
            return
        self.touched = True
        self.pseudo.append((name, value))

    def set(self, name: str, value: str) -> None:
        """Replace every value of ``name`` with one value (appended if absent)."""
        name = name.lower()
        if name[:1] != ":":
            self.headers[name] = value
            return
        self.touched = True
        pseudo = self.pseudo
        for i, (k, _) in enumerate(pseudo):
            if k == name:
                self.pseudo = [*pseudo[:i], (k, value),
                               *[kv for kv in pseudo[i + 1:] if kv[0] != name]]
                return
        pseudo.append((name, value))

    def remove(self, name: str) -> None:
        name = name.lower()
        if name[:1] != ":":
            self.headers.popall(name, None)
            return
        self.touched = True
        self.pseudo = [kv for kv in self.pseudo if kv[0] != name]

    def replace_all(self, items: Iterable[tuple[str, str]]) -> None:
        pairs = [(k.lower(), v) for k, v in items]
        self.touched = True
        self.pseudo = [kv for kv in pairs if kv[0][:1] == ":"]
        self.headers.clear()
        self.headers.extend([kv for kv in pairs if kv[0][:1] != ":"])
