"""Shutting down without dropping admitted work: uvicorn's server with a drain stage before it closes."""

from __future__ import annotations

import asyncio
import logging

import uvicorn
from starlette.applications import Starlette

SHUTDOWN_CLOSE_S = 2.0  # after draining: for the last responses to be written, and the worker to stop


class GracefulServer(uvicorn.Server):
    """uvicorn's server with a first stage to its shutdown: on SIGTERM (or SIGINT) the app drains
    (``Server.drain``) while uvicorn still listens, so that health checks see 503 rather than a refused
    connection; then uvicorn closes as usual. A second signal skips the drain, a third (SIGINT) forces exit."""

    def __init__(self, config: uvicorn.Config, app_server):
        super().__init__(config)
        self.app_server = app_server  # app.Server
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain_requested = False
        self.drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            await super().serve(sockets)
        finally:
            if self.drain_task is not None:  # still waiting, when a second signal cut the drain short
                self.drain_task.cancel()

    def handle_exit(self, sig, frame) -> None:
        # a signal handler (or another thread): only schedule work on the loop from here
        if self.drain_requested or self.loop is None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self.drain_requested = True
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self.drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        await self.app_server.drain()
        self.should_exit = True


def make_server(app: Starlette, *, host: str, port: int, log_level: str = "info") -> GracefulServer:
    """The uvicorn server that runs ``app`` (from ``build_app``) and drains it on shutdown."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        # uvicorn annotates an int but waits with asyncio.timeout, which takes float seconds
        timeout_graceful_shutdown=SHUTDOWN_CLOSE_S,  # type: ignore[arg-type]
    )
    # the server's own messages (API keys, draining) go where uvicorn's go, which its config has just set up,
    # unless the application set up logging for them
    # (uvicorn's handler is on its "uvicorn" logger, which "uvicorn.error" logs through at the --log-level)
    ours, theirs = logging.getLogger("e5lite.serve"), logging.getLogger("uvicorn")
    if not ours.handlers and theirs.handlers:
        ours.handlers = list(theirs.handlers)
        ours.setLevel(logging.getLogger("uvicorn.error").getEffectiveLevel())
    return GracefulServer(config, app.state.server)
