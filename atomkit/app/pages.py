"""What keeps `atomkit app` to its one user: a token, loopback Host names only, and a cap on the page kernels.

Voila starts one kernel per page request, and each kernel loads the models (about 0.8 GB with the default).
``PageKernels`` holds at most ``max_pages`` of them: a new page first ends the longest-idle kernel that no
open page is connected to (a closed tab, a reload, a script's GET), and is refused (503) when every kernel has
an open page. Kernels that no page is connected to are also culled after ``cull_s`` idle seconds; a page that
closes ends its kernel itself (Voila's beforeunload call).

``voila_config`` is the configuration ``serve`` writes (owner-only) beside the page notebook, where Voila reads
it: the token never appears on a command line, which every local user can read.
"""
from __future__ import annotations

import asyncio

from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from tornado import web
from traitlets import Integer

MAX_PAGES = 2  # kernels held at once (each holds the models)
CULL_S = 120  # a kernel no page is connected to ends after this many idle seconds


class PageKernels(AsyncMappingKernelManager):
    """Voila's kernel manager with a cap: see the module docstring."""

    max_pages = Integer(MAX_PAGES, config=True, help="kernels (app pages) held at once")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._starting = asyncio.Lock()

    def _unwatched(self) -> list[str]:
        """Kernels no page is connected to, longest idle first."""
        ids = [k for k in self.list_kernel_ids() if self._kernel_connections.get(k, 0) == 0]
        return sorted(ids, key=lambda k: self.get_kernel(k).last_activity)

    async def start_kernel(self, *args, **kwargs) -> str:
        async with self._starting:  # two requests at once cannot both pass the cap
            while len(self.list_kernel_ids()) >= self.max_pages:
                unwatched = self._unwatched()
                if not unwatched:
                    raise web.HTTPError(503, f"{self.max_pages} app pages are open, the most this server holds: "
                                             "close one, then reload")
                self.log.info("atomkit: ending kernel %s (no page is connected) to start a new page", unwatched[0])
                await self.shutdown_kernel(unwatched[0])
            return await super().start_kernel(*args, **kwargs)


def voila_config(token: str, *, max_pages: int = MAX_PAGES, cull_s: int = CULL_S) -> dict:
    """Voila's settings for a page only its user reaches: the token, Host checked against loopback names
    (Voila itself turns that check off), the kernel cap and the culling of unwatched kernels."""
    return {
        "Voila": {"token": token, "port_retries": 0,
                  "tornado_settings": {"allow_remote_access": False, "local_hostnames": ["localhost"]}},
        "VoilaConfiguration": {"multi_kernel_manager_class": f"{__name__}.PageKernels"},
        "PageKernels": {"max_pages": max_pages},
        "MappingKernelManager": {"cull_idle_timeout": cull_s, "cull_interval": max(5, cull_s // 4),
                                 "cull_connected": False},
    }
