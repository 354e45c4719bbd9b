"""First-fit allocation of byte extents inside one fixed-size arena (the L1 segment).

Extents are aligned (page size by default) so copies into them run at memcpy
speed; freed neighbours coalesce so that evicting entries makes room for
larger ones.  The arena never hands out a byte past its capacity, which is how
the L1 budget holds by construction.
"""

from __future__ import annotations

import bisect


class ExtentAllocator:
    def __init__(self, capacity: int, alignment: int = 4096) -> None:
        if capacity < alignment:
            raise ValueError(f"capacity {capacity} is smaller than the alignment {alignment}")
        self.alignment = alignment
        self.capacity = capacity - capacity % alignment
        self._free_starts: list[int] = [0]  # sorted
        self._free_size: dict[int, int] = {0: self.capacity}
        self.used = 0

    def rounded(self, nbytes: int) -> int:
        return max(self.alignment, -(-nbytes // self.alignment) * self.alignment)

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a free extent of ``rounded(nbytes)`` bytes, or None when none is large enough."""
        size = self.rounded(nbytes)
        for index, start in enumerate(self._free_starts):
            free = self._free_size[start]
            if free >= size:
                del self._free_size[start]
                if free == size:
                    self._free_starts.pop(index)
                else:
                    self._free_starts[index] = start + size
                    self._free_size[start + size] = free - size
                self.used += size
                return start
        return None

    def free(self, offset: int, nbytes: int) -> None:
        size = self.rounded(nbytes)
        index = bisect.bisect_left(self._free_starts, offset)
        assert offset not in self._free_size, f"double free at {offset}"
        self.used -= size
        # merge with the following free extent
        if index < len(self._free_starts) and self._free_starts[index] == offset + size:
            size += self._free_size.pop(self._free_starts[index])
            self._free_starts.pop(index)
        # merge with the preceding free extent
        if index > 0:
            previous = self._free_starts[index - 1]
            if previous + self._free_size[previous] == offset:
                self._free_size[previous] += size
                return
        self._free_starts.insert(index, offset)
        self._free_size[offset] = size

    def largest_free(self) -> int:
        return max(self._free_size.values(), default=0)
