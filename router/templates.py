"""Chat templates rendered in child processes, so that a slow or expanding template costs only its own request.

A render runs `template_sandbox.render_template` in one of a few long-lived worker processes (`python -m
router.template_sandbox`: jinja2 only, an empty environment, so no secret of the router is in reach, and an
address-space limit). The sandbox stops most runaway templates itself (deadline, character budget); a render
that outlives the deadline anyway, or whose client goes away, has its worker killed and replaced, so nothing
keeps running for nobody, and the router's own threads and memory never carry a template's work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from common.limits import MAX_TEMPLATE_SECONDS
from router.template_sandbox import FRAME

log = logging.getLogger("loom.templates")

# The sandbox's own deadline counts the worker's CPU time; past this many times it in wall time (a render stuck
# in one long C call, or a machine so busy that it starves), the worker is killed.
KILL_AFTER = 3
START_TIMEOUT_S = 60.0  # for a worker to start (import jinja2) and say it is ready
WORKER_MEMORY_BYTES = 512 << 20  # address space a worker may add to what it has after start-up
MAX_WORKERS = 4
# Where the `router` package lies: the worker starts there (python -m puts it on sys.path), however Loom is installed.
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


class TemplateRenderError(Exception):
    """The template could not be rendered within its limits; the message says why without quoting it."""


class _Worker:
    def __init__(self, process: asyncio.subprocess.Process):
        self.process = process

    @classmethod
    async def start(cls) -> "_Worker":
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-E", "-s", "-m", "router.template_sandbox", str(WORKER_MEMORY_BYTES),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=_child_env(), cwd=_PACKAGE_ROOT)
        worker = cls(process)
        try:  # its start-up is not a template's time
            await asyncio.wait_for(worker._read(), START_TIMEOUT_S)
        except BaseException:
            if worker.alive:
                process.kill()
            await process.wait()
            raise
        return worker

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def ask(self, request: dict) -> dict:
        data = json.dumps(request, ensure_ascii=False).encode("utf-8")
        self.process.stdin.write(FRAME.pack(len(data)) + data)
        await self.process.stdin.drain()
        return await self._read()

    async def _read(self) -> dict:
        size = FRAME.unpack(await self.process.stdout.readexactly(FRAME.size))[0]
        return json.loads(await self.process.stdout.readexactly(size))


def _child_env() -> dict[str, str]:
    """Nothing of the router's environment (API keys, hub tokens) but what Python needs to start."""
    return {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "SYSTEMROOT")}


class TemplateRenderer:
    """At most `workers` renders at once, each in its own worker process; workers are started on demand and
    kept for the next render unless killed."""

    def __init__(self, workers: int = MAX_WORKERS, seconds: float = MAX_TEMPLATE_SECONDS):
        self.seconds = seconds
        self._slots = asyncio.Semaphore(workers)
        self._idle: list[_Worker] = []
        self._live: set[_Worker] = set()
        self._reaping: set[asyncio.Task] = set()
        self._warming: asyncio.Future | None = None
        self._closed = False

    async def render(self, source: str, context: dict[str, Any], max_chars: int) -> str:
        """`source` rendered with `context`; raises TemplateRenderError past a limit or when the template fails.
        Cancelling the caller kills the render."""
        request = {"template": source, "context": context, "max_chars": max_chars, "seconds": self.seconds}
        async with self._slots:
            worker = await self._take()
            try:
                reply = await asyncio.wait_for(worker.ask(request), self.seconds * KILL_AFTER)
            except asyncio.TimeoutError:
                self._kill(worker)
                raise TemplateRenderError(f"the chat template took longer than {self.seconds * KILL_AFTER:g} s "
                                          "to render") from None
            except (asyncio.IncompleteReadError, ConnectionError):
                self._kill(worker)
                raise TemplateRenderError("the chat template used more memory than it may") from None
            except BaseException:  # cancelled (the client went away) or broken: the render stops here
                self._kill(worker)
                raise
            self._idle.append(worker)
        if "error" in reply:
            raise TemplateRenderError(reply["message"])
        return reply["text"]

    def warm(self) -> None:
        """Starts one worker in the background, ahead of the next chat request (unless one is starting)."""
        if self._closed or (self._warming is not None and not self._warming.done()):
            return

        async def start_one() -> None:
            try:
                worker = await self._start()
            except Exception as e:  # the first render starts one again, and reports it
                log.warning("a chat template worker did not start: %r", e)
                return
            if self._closed:
                self._kill(worker)
            else:
                self._idle.append(worker)

        self._warming = asyncio.ensure_future(start_one())

    async def close(self) -> None:
        self._closed = True
        if self._warming is not None:
            self._warming.cancel()
        for worker in list(self._live):
            self._kill(worker)
        if self._reaping:
            await asyncio.gather(*self._reaping, return_exceptions=True)

    async def _take(self) -> _Worker:
        while self._idle:
            worker = self._idle.pop()
            if worker.alive:
                return worker
            self._kill(worker)
        return await self._start()

    async def _start(self) -> _Worker:
        worker = await _Worker.start()
        self._live.add(worker)
        return worker

    def _kill(self, worker: _Worker) -> None:
        """Kills the worker at once (no await: this runs on cancellation too), reaps it in the background, and
        has a replacement started when no worker is left idle."""
        self._live.discard(worker)
        if worker.alive:
            try:
                worker.process.kill()
            except ProcessLookupError:
                pass
        task = asyncio.ensure_future(worker.process.wait())
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)
        if not self._idle:
            self.warm()
