"""Graceful drain: on SIGTERM (or Ctrl+C) the server stops admitting, lets what is running
finish within a deadline, then exits with status 0.

``Drain`` is the app's side: it knows the requests in flight, answers new ones 503 with
``Retry-After`` (and ``/health`` 503) while draining, and at the deadline ends every sequence
still running with an error its client sees (an error chunk, or a 503). ``serve`` runs the app
under uvicorn with a server whose first signal drains before uvicorn's own shutdown; a second
signal shuts down at once.

Written here rather than left to uvicorn: uvicorn stops listening at the first signal (so
nothing can report the drain), waits without bound for running responses, and re-raises the
signal after its shutdown, so the process ends killed by SIGTERM (status -15) instead of
exiting 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Any

import uvicorn

from grok.serve.engine import Engine
from grok.serve.protocol import RequestError
from grok.serve.sequence import SequenceRequest, Update

log = logging.getLogger("grok.serve")

# Below Kubernetes' default 30 s grace period, so a pod exits on its own before SIGKILL.
DEFAULT_DRAIN_TIMEOUT_S = 25.0
# What a refused client is told to wait (503: queue full, or draining): a queue frees slots
# within a few steps, and a load balancer stops routing to a draining server.
RETRY_AFTER_S = 1
# After the drain, the most uvicorn waits for responses to finish sending (the last chunks of
# streams that just ended); then it cancels them. Exit comes within drain timeout + this.
SHUTDOWN_GRACE_S = 2.0
_POLL_S = 0.05


class Drain:
    """The requests in flight, and whether the server is draining.

    Attributes:
      timeout: seconds the running sequences get to finish once draining starts.
      draining: whether new requests are refused.
    """

    def __init__(self, engine: Engine, timeout: float = DEFAULT_DRAIN_TIMEOUT_S):
        self.engine = engine
        self.timeout = timeout
        self.draining = False
        self._requests: list[tuple[list[SequenceRequest], asyncio.Queue[Update]]] = []

    def admit(self) -> None:
        """503 with ``Retry-After`` while draining."""
        if self.draining:
            raise RequestError(
                "the server is shutting down and takes no new requests; retry on another",
                status=503,
                type="server_error",
                code="shutting_down",
                retry_after=RETRY_AFTER_S,
            )

    def track(self, seqs: list[SequenceRequest], updates: asyncio.Queue[Update]) -> None:
        """Remembers a request's sequences and the queue its handler reads."""
        self._requests = [r for r in self._requests if any(map(_live, r[0]))]
        self._requests.append((seqs, updates))

    def live(self) -> int:
        """How many tracked sequences are still to finish."""
        return sum(_live(seq) for seqs, _ in self._requests for seq in seqs)

    async def run(self) -> None:
        """Drains: refuses new requests, waits until every sequence has finished (or the
        engine has failed, when none can), and at the deadline ends the rest with an error."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        log.warning(
            "draining: %d sequence(s) running; exiting when they finish, at most %g s",
            self.live(),
            self.timeout,
        )
        while self.live() and self.engine.healthy and loop.time() < deadline:
            await asyncio.sleep(_POLL_S)
        if self.live():
            self._end_all(
                f"the server shut down before this sequence finished (--drain-timeout "
                f"{self.timeout:g} s)"
            )
            await asyncio.sleep(_POLL_S)  # the handlers take their error
        log.warning("drained; shutting down")

    def _end_all(self, message: str) -> None:
        """Ends every request still running: its handler gets ``message`` as an error, and its
        sequences are cancelled (their slots freed)."""
        for seqs, updates in self._requests:
            running = [seq for seq in seqs if _live(seq)]
            if running:
                updates.put_nowait(Update(running[0].index, error=message))
            for seq in running:
                seq.cancel()


def _live(seq: SequenceRequest) -> bool:
    return seq.finish_reason is None and not seq.cancelled


class DrainingServer(uvicorn.Server):
    """uvicorn's server, where the first SIGTERM or SIGINT runs ``Drain.run`` before uvicorn's
    shutdown, and a second one shuts down at once."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain
        self._asked = False
        self._task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as the signal handler, between two bytecodes of the event loop's thread: it
        # only sets flags, and on_tick starts the drain on the loop. The signal is not kept
        # for uvicorn to re-raise after its shutdown (that would end the process by SIGTERM).
        del frame
        if self._asked:
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT
        self._asked = True

    async def on_tick(self, counter: int) -> bool:
        if self._asked and self._task is None:
            self._task = asyncio.create_task(self._drain_then_exit())
        return await super().on_tick(counter)

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain.run()
        finally:
            self.should_exit = True


def serve(app: Any, drain: Drain, *, host: str, port: int) -> None:
    """Serves ``app`` on host:port until a signal, then drains and returns (status 0)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    DrainingServer(config, drain).run()


__all__ = ["DEFAULT_DRAIN_TIMEOUT_S", "Drain", "DrainingServer", "serve"]
