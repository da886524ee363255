"""Running one planned request and answering the app, whatever API it speaks.

The handlers (``sidecar.chat`` for the OpenAI endpoints,
``sidecar.anthropic_messages`` for Anthropic's) plan a request and hand it to
``answer``: the attempts (``sidecar.rescue.serve``), then the failure in the
app's API's error shape, or the upstream's answer through ``sidecar.relay``,
all while ``DisconnectWatch`` looks out for the app hanging up. What differs
between the APIs is a ``Dialect``. Every attempt is in the request's book,
flushed to the control plane before ``answer`` returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .asgi import Receive, Send, send_error
from .book import RequestBook
from .chat_app import ChatApp
from .errors import ErrorResponse
from .proxy import AttemptsFailed, UpstreamReply, describe, excluded_header
from .relay import StreamWatch, relay
from .rescue import Rescue, Sending, serve
from .router import Attempt
from .upstream import RequestBody

__all__ = ["Dialect", "DisconnectWatch", "Planned", "answer"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Dialect:
    """How an API tells the app what went wrong (``sidecar.relay`` has the details)."""

    # The sidecar's own error in the API's shape (None: OpenAI's, as made).
    error: Callable[[ErrorResponse], ErrorResponse] | None = None
    # A broken event stream is told with a typed ``event: error`` (the Responses API).
    typed_errors: bool = False
    # The events telling a broken and a cut stream (None: OpenAI's).
    broken_event: bytes | None = None
    cut_event: bytes | None = None
    # Looks at a stream for an error the upstream told in band (None: nothing to look for).
    watch: Callable[[], StreamWatch] | None = None


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class DisconnectWatch:
    """Cancels the request's task if the app hangs up while it is being answered.

    Watching costs a task per request, so it starts only once the request has
    been in flight for ``after`` seconds: a hang-up is acted on within that
    time, and the many requests answered sooner (a cached or tiny completion)
    never pay for a watcher. ``close()`` before returning; ``gone`` says whether
    the watcher cancelled the task (the caller then ``uncancel()``s it).
    """

    __slots__ = ("_receive", "_task", "_timer", "_watcher", "gone")

    def __init__(self, receive: Receive, task: asyncio.Task[Any], after: float) -> None:
        self._receive = receive
        self._task = task
        self._watcher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.gone = False
        if after > 0:
            self._timer = task.get_loop().call_later(after, self._start)
        else:
            self._start()

    def _start(self) -> None:
        self._timer = None
        if not self._task.done():
            self._watcher = self._task.get_loop().create_task(self._watch())

    async def _watch(self) -> None:
        await _wait_for_disconnect(self._receive)
        self.gone = True
        self._task.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        watcher = self._watcher
        if watcher is not None and not watcher.done():
            watcher.cancel()


@dataclass(slots=True)
class Planned:
    """One request as planned: what its attempts (``sidecar.rescue.serve``) are given."""

    plan: list[Attempt]
    body_for: Callable[[str], RequestBody]  # the body for an upstream model
    headers: dict[str, str]  # the app's, some forwarded upstream
    stream: bool
    deadline: float  # loop time
    sending: Sending
    rescue: Callable[[], Rescue] | None  # called only should no key be able to serve


async def answer(
    app: ChatApp,
    book: RequestBook,
    planned: Planned,
    receive: Receive,
    send: Send,
    dialect: Dialect,
    created: Callable[[UpstreamReply], None] | None = None,
) -> int:
    """Run the request's attempts and answer the app; the status answered (499: the app hung up).

    ``created``: told of the upstream's answer before it is relayed (``sidecar.affinity``)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task(loop)
    if task is None:  # pragma: no cover - uvicorn runs every request in a task
        raise RuntimeError("a request must run in a task")
    watch = DisconnectWatch(receive, task, app.disconnect_watch_after)
    status = 499
    try:
        result = await _attempt(app, book, planned)
        status = await _reply(app, book, result, send, dialect, created)
    except asyncio.CancelledError:
        if not watch.gone:
            raise
    finally:
        watch.close()
        # Also when the app hung up mid-way: what was attempted is reported.
        book.flush()
    if watch.gone:
        # The watcher's cancellation (the answer may have swallowed it): undo it,
        # but keep any cancellation requested by someone else (e.g. shutdown).
        if task.uncancel() > 0:
            raise asyncio.CancelledError
        app.metrics.client_disconnects.inc()
        return 499
    return status


async def _reply(
    app: ChatApp,
    book: RequestBook,
    result: UpstreamReply | AttemptsFailed,
    send: Send,
    dialect: Dialect,
    created: Callable[[UpstreamReply], None] | None,
) -> int:
    """Pass the answer (or the failure) to the app."""
    if isinstance(result, AttemptsFailed):
        _log.warning(
            "request %s for %s failed after %d attempt(s); excluded %s",
            book.request_id,
            book.model,
            result.attempts,
            excluded_header(book.excluded) or "-",
        )
        error = result.error if dialect.error is None else dialect.error(result.error)
        return await send_error(send, error, book.headers(attempts=result.attempts))
    if _log.isEnabledFor(logging.DEBUG):  # per request: DEBUG (an access log is ``--access-log``)
        _log.debug(
            "request %s for %s answered %d by %s after %d attempt(s)%s",
            book.request_id,
            book.model,
            result.response.status,
            describe(result.attempt),
            result.attempts,
            f"; excluded {excluded_header(book.excluded)}" if book.excluded else "",
        )
    if created is not None:
        created(result)
    own = book.headers(attempts=result.attempts, answer=result.attempt.key, target=result.attempt.target)
    return await relay(
        book,
        result,
        own,
        send,
        metrics=app.metrics,
        wall_clock=app.state.wall_clock,
        typed_errors=dialect.typed_errors,
        broken_event=dialect.broken_event,
        cut_event=dialect.cut_event,
        watch=dialect.watch() if dialect.watch is not None and result.streaming else None,
        metering=book.metering,
    )


async def _attempt(app: ChatApp, book: RequestBook, planned: Planned) -> UpstreamReply | AttemptsFailed:
    """The attempts of one request, whatever its endpoint: ``sidecar.rescue.serve`` (the
    plan, then panic probes, waits or an honest answer when no key could serve), with
    the request's book brought up to date."""
    health = book.health
    wall_clock = app.state.wall_clock

    def blocked(attempt: Attempt) -> str | None:
        if attempt.key is None:
            return None
        return health.key_block_reason(attempt.key.id, attempt.target.upstream_model, wall_clock())

    result = await serve(
        app.upstream,
        planned.plan,
        planned.body_for,
        planned.headers,
        stream=planned.stream,
        deadline=planned.deadline,
        sending=planned.sending,
        rescue=planned.rescue,
        observer=book,
        excluded=book.excluded,
        blocked=blocked,
        wall_clock=wall_clock,
    )
    book.excluded = dict(result.excluded)
    if book.access is not None:
        book.access.answered(result.attempts, None if isinstance(result, AttemptsFailed) else result.attempt)
    return result
