"""The one cache of what is read from sealed images.

Decoded inodes, directory listings, extent maps, xattrs and inode-table blocks of
every image a process reads share one bounded LRU. Sealed images never change, so
nothing in it is ever updated or invalidated entry by entry: each opened tree keys
its entries with a token of its own, an image deleted or written anew is opened as
a new tree (a new token), and entries nobody asks for any more age out. The bound
is a rough cost in bytes, so many images together stay within one memory budget.
"""
import threading
from collections import OrderedDict

DEFAULT_BUDGET = 64 << 20


class Cache:
    def __init__(self, budget=DEFAULT_BUDGET):
        self.budget = budget
        self.cost = 0
        self._items = OrderedDict()     # key -> (value, cost), least recently used first
        self._lock = threading.Lock()

    def get(self, key, make, cost):
        """The value under ``key``; made by ``make()`` (costing ``cost(value)``) if absent."""
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                return item[0]
        value = make()                  # outside the lock: it may read the disk
        size = cost(value)
        with self._lock:
            if key not in self._items:
                self._items[key] = (value, size)
                self.cost += size
                while self.cost > self.budget and len(self._items) > 1:
                    _, (_, dropped) = self._items.popitem(last=False)
                    self.cost -= dropped
        return value

    def __len__(self):
        return len(self._items)
