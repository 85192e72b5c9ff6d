"""A small thread-safe LRU cache whose values are built once per key (the sessions' fitted
methods and leave-one-out runs)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any


class _LruCache:
    """A small thread-safe LRU map whose values are built once per key, even under concurrency."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._values: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[Any, threading.Lock] = {}

    def peek(self, key: Any) -> Any:
        """The value of `key` if it is built, else None (never waits for a build)."""
        with self._lock:
            return self._values.get(key)

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
            gate = self._building.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if key in self._values:
                    return self._values[key]
            value = build()
            with self._lock:
                self._values[key] = value
                self._building.pop(key, None)
                while len(self._values) > self.size:
                    self._values.popitem(last=False)
            return value
