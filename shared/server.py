"""The app scaffold both servers stand on: ``/health``, ``/ready`` and ``/metrics``, one error format,
body limits, request metrics, bearer auth, and a service that starts in the background.

The service (a loaded model, started worker processes) starts once the app has, so that ``/health``
answers at once; until the service is up, ``/ready`` answers 503 saying what is happening, and so do the
routes that need it (:func:`started_service`). A service that fails to start stops the server, which
:func:`serve` then reports in one line: a server that can never become ready should not linger.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import SecretStr

from shared.http import (
    BearerAuth,
    BodyLimit,
    Instrument,
    ServiceError,
    UnexpectedErrors,
    install_error_handlers,
)
from shared.schemas import ErrorResponse, Health, Readiness
from shared.settings import show_settings, warn_if_exposed

log = logging.getLogger("cppo.server")


class StartedService(Protocol):
    def readiness(self) -> Readiness:
        """``/ready``'s body once the service has started."""
        ...


S = TypeVar("S", bound=StartedService)


class ServerSettings(Protocol):
    api_key: SecretStr | None
    max_request_bytes: int


class ListenSettings(Protocol):
    host: str
    port: int
    api_key: SecretStr | None
    log_level: str
    drain_s: float


class ServiceStartError(ValueError):
    """The service could not start (a model that does not load, a plugin that fails in the workers)."""


class RequestMetrics:
    """A server's Prometheus registry (its own, so that several apps can share a process), with the HTTP
    metrics every server has; each server adds its own to it."""

    def __init__(self, service: str, latency_buckets: Sequence[float]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"cppo_{service}_requests",
            "HTTP requests, by route and status code",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            f"cppo_{service}_request_seconds",
            "HTTP request latency, by route",
            ["route"],
            buckets=latency_buckets,
            registry=self.registry,
        )


@dataclass
class Startup(Generic[S]):
    """How a server's service starts and stops, and how far it has got."""

    start: Callable[[], Awaitable[S]]
    """Starts the service and returns it; what it raises is why the service never starts."""
    close: Callable[[S | None], Awaitable[None]]
    """Stops what ``start`` started, at shutdown: given the service, or None if ``start`` had not returned."""
    starting: str
    """What ``/ready`` says while the service starts."""
    waiting: str
    """What a route that needs the service says meanwhile."""
    service: S | None = field(default=None, init=False)
    error: str | None = field(default=None, init=False)
    on_failure: Callable[[], None] = field(default=lambda: None, init=False)
    """What to do once ``error`` is set: :func:`serve` stops the server."""

    async def run(self) -> None:
        try:
            self.service = await self.start()
        except Exception as error:
            self.error = f"{type(error).__name__}: {error}"
            log.error("the service failed to start: %s", self.error)
            log.debug("why the service failed to start", exc_info=True)
            self.on_failure()


def started_service(request: Request) -> Any:
    """A dependency: the app's service, once started; 503 until then, or with the reason it failed."""
    startup: Startup[Any] = request.app.state.startup
    if startup.service is None:
        raise ServiceError(503, None, "not_ready", startup.error or startup.waiting)
    return startup.service


def service_app(
    startup: Startup[S],
    *,
    title: str,
    summary: str,
    ready_doc: str,
    settings: ServerSettings,
    metrics: RequestMetrics,
    errors: Iterable[int],
    body_limits: dict[str, int] | None = None,
    query_key_paths: frozenset[str] = frozenset(),
) -> FastAPI:
    """An app with the operations routes, whose service ``startup`` starts once the app has started.

    ``ready_doc`` documents ``/ready``; ``errors`` are the status codes documented for every route, with
    an ``ErrorResponse`` body. Requests need ``settings.api_key`` as a bearer token, if set (on
    ``query_key_paths`` also as ``?api_key=``), and may send up to ``settings.max_request_bytes``
    (``body_limits`` by path).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(startup.run())
        yield
        starting.cancel()
        await startup.close(startup.service)

    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    app = FastAPI(
        title=title,
        summary=summary,
        lifespan=lifespan,
        responses={code: {"model": ErrorResponse} for code in errors},
    )
    app.state.startup = startup
    install_error_handlers(app)
    # Outermost last: Instrument counts every answer, the 500s of UnexpectedErrors included; BearerAuth
    # answers before BodyLimit lets any of the body in; BodyLimit's own exception never reaches
    # UnexpectedErrors.
    app.add_middleware(BodyLimit, default_limit=settings.max_request_bytes, limits=body_limits)
    app.add_middleware(BearerAuth, api_key=api_key, query_key_paths=query_key_paths)
    app.add_middleware(UnexpectedErrors)
    app.add_middleware(Instrument, requests=metrics.requests, latency=metrics.latency)

    @app.get("/health", tags=["ops"])
    async def health() -> Health:
        """The process is alive."""
        return Health()

    @app.get("/ready", tags=["ops"], description=ready_doc, responses={503: {"model": Readiness}})
    async def ready() -> JSONResponse:
        if startup.service is None:
            body = Readiness(ready=False, detail=startup.error or startup.starting)
            return JSONResponse(body.model_dump(), status_code=503)
        return JSONResponse(startup.service.readiness().model_dump())

    @app.get("/metrics", tags=["ops"])
    async def prometheus() -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(
    app: FastAPI,
    settings: ListenSettings,
    title: str,
    configure_logging: Callable[[], None] = lambda: None,
) -> None:
    """Show the settings (under ``title``) and serve ``app`` until stopped (SIGTERM drains for at most
    ``settings.drain_s``). A port in use, or a service that fails to start, is a :class:`ValueError`
    naming it, for the command line's one-line error. ``configure_logging`` runs once uvicorn has set up
    its loggers."""
    check_port_free(settings.host, settings.port)
    show_settings(settings, title)
    warn_if_exposed(settings.host, settings.api_key)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.drain_s,
    )
    configure_logging()
    server = uvicorn.Server(config)
    startup: Startup[Any] = app.state.startup

    def stop() -> None:
        server.should_exit = True

    startup.on_failure = stop
    server.run()
    if startup.error is not None:
        raise ServiceStartError(f"the service failed to start: {startup.error}")


def check_port_free(host: str, port: int) -> None:
    """Refuse, naming the port and the flag, a port something already listens on (uvicorn would log
    ``[Errno 98]`` and exit with code 3)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                in_use = f"port {port} on {host} is already in use; choose another with --port"
                raise ValueError(in_use) from None
            raise ValueError(f"cannot listen on {host}:{port}: {error.strerror}") from None
