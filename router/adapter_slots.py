"""Which adapters the running batch holds, under --max-active-adapters and the device pool's pages."""

from __future__ import annotations

from collections.abc import Callable

from router.generation import GenerationRequest


class AdapterSlots:
    """Reference counts of the adapters in the running batch; an adapter's pool pages count from its first
    running request to its last, and exactly the pages counted in are counted out."""

    def __init__(self, max_active: int, pages: int):
        self.max_active = max_active
        self.pages = pages  # pool pages admission may share out
        self.pages_used = 0
        self._refs: dict[str, int] = {}  # adapter id -> running requests using it
        self._pages: dict[str, int] = {}  # adapter id -> the pages counted when it joined
        self.on_active: Callable[[], None] | None = None  # an adapter joined the running batch

    def fits(self, request: GenerationRequest) -> bool:
        adapter = request.adapter_id
        if not adapter or adapter in self._refs:
            return True
        return len(self._refs) < self.max_active and self.pages_used + request.adapter_pages <= self.pages

    def acquire(self, request: GenerationRequest) -> None:
        adapter = request.adapter_id
        if not adapter:
            return
        if adapter not in self._refs:
            self._pages[adapter] = request.adapter_pages
            self.pages_used += request.adapter_pages
            if self.on_active is not None:
                self.on_active()
        self._refs[adapter] = self._refs.get(adapter, 0) + 1

    def release(self, request: GenerationRequest) -> None:
        adapter = request.adapter_id
        if not adapter:
            return
        self._refs[adapter] -= 1
        if not self._refs[adapter]:
            del self._refs[adapter]
            self.pages_used -= self._pages.pop(adapter)

    @property
    def active(self) -> list[str]:
        return list(self._refs)

    def users(self, adapter_id: str) -> int:
        """Running requests with `adapter_id`."""
        return self._refs.get(adapter_id, 0)

    @property
    def max_running(self) -> int:
        """Adapters that can run at once: --max-active-adapters, and each takes at least one pool page."""
        return min(self.max_active, self.pages)
