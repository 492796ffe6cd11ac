"""Runs an LLMEngine's step loop and streams each request's outputs to asyncio callers on another thread.

The loop runs on its own thread (`start`) or on the calling one (`run`): `evalpipe serve` gives it the main thread
and the HTTP server a background one, because torch's CPU kernels run measurably slower on a thread other than the
main one (runtime/SERVING.md, "Where the loop runs").

Callers (the HTTP server) never touch the engine directly: additions and aborts go through an inbox that the loop
drains between steps, and outputs come back through per-request asyncio queues. If a caller stops listening
(client disconnect, cancelled task) its request is aborted and its KV blocks freed at the next step boundary.
If a step raises, the engine is dead: every pending request gets the error, new ones are refused, and
`error` says why (the server reports it on /health) - failing fast beats hanging. `fail()` declares the same from
outside the loop, for a failure noticed elsewhere (a tensor-parallel rank died) while the loop may be blocked.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from runtime.engine.engine import LLMEngine, RequestOutput
from runtime.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.error: BaseException | None = None
        self._inbox: list[tuple] = []
        self._wakeup = threading.Condition()
        self._streams: dict[str, _Stream] = {}
        self._stopped = False
        self._finished = False  # the loop has returned (stopped or failed)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run the loop on a new thread."""
        self._thread = threading.Thread(target=self.run, name="engine-loop", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop the loop after its current step; returns False if it is still running after `timeout` seconds
        (blocked in a collective with a dead rank, say)."""
        with self._wakeup:
            self._stopped = True
            self._wakeup.notify()
        if self._thread is None:  # the loop runs on a caller's thread, which waits for it
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def fail(self, exc: BaseException) -> None:
        """Declare the engine dead (callable from any thread): health goes bad, pending and new requests fail."""
        with self._wakeup:
            if self.error is not None:
                return
            self.error = exc
        dead = EngineDeadError(f"the engine has stopped: {type(exc).__name__}: {exc}")
        for request_id in list(self._streams):
            self._deliver(request_id, dead)

    @property
    def healthy(self) -> bool:
        return self.error is None and not self._finished

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        """Submit one request and yield its outputs until it finishes; raises InvalidRequestError up front."""
        self.engine.check_request(prompt_token_ids, params)
        if not self.healthy:
            raise EngineDeadError(f"the engine has stopped: {type(self.error).__name__}: {self.error}")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._post(("add", request_id, prompt_token_ids, params, time.monotonic()))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._post(("abort", request_id))

    def _post(self, message: tuple) -> None:
        with self._wakeup:
            self._inbox.append(message)
            self._wakeup.notify()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def run(self) -> None:
        """Step until shutdown() or a failure, on the calling thread. Ctrl-C or SIGTERM (on the main thread) fails
        the pending requests and propagates."""
        engine = self.engine
        try:
            while True:
                with self._wakeup:
                    while not self._stopped and not self._inbox and not engine.has_unfinished():
                        self._wakeup.wait()
                    if self._stopped:
                        return
                    inbox, self._inbox = self._inbox, []
                for kind, request_id, *rest in inbox:
                    if kind == "add":
                        if request_id in self._streams:  # not cancelled while queued
                            try:
                                engine.add_request(request_id, *rest)
                            except Exception as exc:  # noqa: BLE001 - a request that cannot start fails alone
                                self._deliver(request_id, exc)
                    else:
                        engine.abort_request(request_id)
                for out in engine.step():
                    self._deliver(out.request_id, out)
        except (KeyboardInterrupt, SystemExit):
            self.fail(RuntimeError("the server is shutting down"))
            raise
        except BaseException as exc:  # noqa: BLE001 - any failure ends the engine; callers must hear about it
            log.exception("engine loop failed; refusing further requests")
            self.fail(exc)
        finally:
            self._finished = True
