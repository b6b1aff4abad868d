"""The contents of one regular file: what readers see now, and what survives power loss.

Data lives in fixed-size pages so that an fsync costs O(dirty pages), not O(file size),
and so that a failed fsync can discard exactly what Linux discards after a writeback
error: whole dirty pages.

Invariants:
- ``pages`` (volatile) and ``durable_pages`` never share a buffer: volatile pages are
  mutable ``bytearray``s, durable pages are immutable ``bytes`` copied at sync time.
- Every page is exactly ``PAGE_SIZE`` long; a page that does not exist reads as zeros
  (a hole). Bytes of the last page beyond ``size`` are always zero, so growing the file
  later (truncate, fallocate, a write past the end) exposes zeros, as POSIX requires.
- ``dirty`` holds every page number whose volatile content may differ from its durable
  content and that the next fsync will write, including pages that were removed
  (truncated or punched away).
- ``discarded`` holds pages whose volatile content differs from the durable one but that
  no fsync will write (a failed fsync dropped them), until they are written again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PAGE_SIZE = 4096
_ZERO_PAGE = bytes(PAGE_SIZE)


@dataclass(slots=True)
class FileData:
    pages: dict[int, bytearray] = field(default_factory=dict)
    size: int = 0
    dirty: set[int] = field(default_factory=set)
    durable_pages: dict[int, bytes] = field(default_factory=dict)
    durable_size: int = 0
    discarded: set[int] = field(default_factory=set)

    @property
    def has_unsynced_changes(self) -> bool:
        return bool(self.dirty) or bool(self.discarded) or self.size != self.durable_size

    @property
    def allocated_bytes(self) -> int:
        return len(self.pages) * PAGE_SIZE

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        chunks: list[bytes | bytearray | memoryview] = []
        position = offset
        while position < end:
            page_number, start = divmod(position, PAGE_SIZE)
            stop = min(PAGE_SIZE, start + (end - position))
            page = self.pages.get(page_number)
            chunks.append(_ZERO_PAGE[start:stop] if page is None else memoryview(page)[start:stop])
            position += stop - start
        return b"".join(chunks)

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        position = offset
        while view:
            page_number, start = divmod(position, PAGE_SIZE)
            count = min(PAGE_SIZE - start, len(view))
            page = self.pages.get(page_number)
            if page is None:
                page = self.pages[page_number] = bytearray(PAGE_SIZE)
            page[start : start + count] = view[:count]
            self.dirty.add(page_number)
            view = view[count:]
            position += count
        self.size = max(self.size, offset + len(data))

    def truncate(self, new_size: int) -> None:
        if new_size < self.size:
            self._zero_range(new_size, self.size - new_size)
        self.size = new_size

    def zero_range(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros without changing the size."""
        self._zero_range(offset, min(length, max(0, self.size - offset)))

    def _zero_range(self, offset: int, length: int) -> None:
        end = offset + length
        position = offset
        while position < end:
            page_number, start = divmod(position, PAGE_SIZE)
            stop = min(PAGE_SIZE, start + (end - position))
            page = self.pages.get(page_number)
            if page is not None:
                if start == 0 and stop == PAGE_SIZE:
                    del self.pages[page_number]
                else:
                    page[start:stop] = _ZERO_PAGE[start:stop]
                self.dirty.add(page_number)
            position += stop - start

    def sync(self) -> int:
        """Make the volatile contents and size durable; returns the bytes copied."""
        copied = 0
        for page_number in self.dirty:
            page = self.pages.get(page_number)
            if page is None:
                self.durable_pages.pop(page_number, None)
            else:
                self.durable_pages[page_number] = bytes(page)
                copied += PAGE_SIZE
        self.discarded -= self.dirty
        self.dirty.clear()
        self.durable_size = self.size
        return copied

    def discard_dirty(self) -> None:
        """What Linux does after a writeback error: dirty pages become clean without
        reaching the disk. Readers still see the new bytes until power is lost; a later
        successful fsync does not write them (unless they are written again)."""
        self.discarded |= self.dirty
        self.dirty.clear()

    def unsynced_bytes(self) -> int:
        """How many bytes of file data a power loss would drop or change right now."""
        extent = max(self.size, self.durable_size)
        changed = sum(
            max(0, min(PAGE_SIZE, extent - page_number * PAGE_SIZE)) for page_number in self.dirty | self.discarded
        )
        # Growth past the durable size that no dirty page covers (truncate/fallocate up).
        return max(changed, abs(self.size - self.durable_size))

    def revert_to_durable(self) -> None:
        self.pages = {number: bytearray(page) for number, page in self.durable_pages.items()}
        self.size = self.durable_size
        self.dirty.clear()
        self.discarded.clear()
