"""`kvserve serve`: the FastAPI app (OpenAI routes, TGI routes, /health, /metrics; API-key check, CORS,
errors) and its life under uvicorn.

Life cycle: uvicorn binds the port, the lifespan starts the AsyncLLM's engine thread, which loads the
model while /health answers 503; once loaded, /health answers 200 and generating routes open. On
SIGTERM/SIGINT uvicorn stops accepting, waits up to --shutdown-timeout for in-flight responses, then the
lifespan stops the engine thread (aborting whatever is left) and the process exits 0. If the model
fails to load, the server shuts down and exits 1.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import sys
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

import kvserve
from kvserve.engine.async_engine import AsyncLLM
from kvserve.entrypoints import tgi
from kvserve.entrypoints.metrics import CONTENT_TYPE, ServerMetrics
from kvserve.entrypoints.openai.errors import (
    APIError,
    bad_request,
    install_error_handlers,
    render_error,
    service_unavailable,
)
from kvserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from kvserve.entrypoints.openai.serving_chat import OpenAIServingChat
from kvserve.entrypoints.openai.serving_completion import OpenAIServingCompletion
from kvserve.entrypoints.openai.serving_engine import OpenAIServing
from kvserve.server_config import ServerConfig

logger = logging.getLogger("kvserve.server")

OPEN_PATHS = frozenset({"/health", "/metrics"})  # no API key needed
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 503)}
_GENERATE_RESPONSES = {
    **_ERRORS,
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events with stream: true"},
}


def build_app(config: ServerConfig, started_at: float | None = None) -> FastAPI:
    """The app and everything it owns: the AsyncLLM (not started until the lifespan), metrics, handlers."""
    started_at = time.monotonic() if started_at is None else started_at
    metrics = ServerMetrics(config.log_stats_interval)
    engine = AsyncLLM(config.engine_args(), observer=metrics, max_queued_requests=config.max_queued_requests)
    serving = OpenAIServing(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        watcher = asyncio.create_task(_watch_startup(app, engine, started_at))
        yield
        watcher.cancel()
        await engine.shutdown()

    app = FastAPI(
        title="kvserve", version=kvserve.__version__, lifespan=lifespan,
        description="OpenAI- and TGI-compatible LLM server with continuous batching and a paged KV cache.",
    )  # fmt: skip
    app.state.engine, app.state.metrics, app.state.serving = engine, metrics, serving
    app.state.tgi = tgi.TGIServing(serving)
    app.state.exit_code = 0
    install_error_handlers(app, tgi.TGI_PATHS)
    _add_routes(app, engine, serving, metrics)
    app.include_router(tgi.router, dependencies=[Depends(_require_ready)])
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    if config.allowed_origins:  # added last, so it runs first: preflight requests never need the key
        app.add_middleware(
            CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"], allow_headers=["*"]
        )
    return app


async def _require_ready(request: Request) -> None:
    engine: AsyncLLM = request.app.state.engine
    if engine.error is not None:
        raise APIError(500, f"The engine failed: {engine.error!r}", code="engine_dead")
    if not engine.is_ready:
        raise service_unavailable("The model is still loading. Retry shortly.", code="engine_loading", retry_after=5)


async def _watch_startup(app: FastAPI, engine: AsyncLLM, started_at: float) -> None:
    try:
        await engine.wait_until_ready()
    except Exception:  # noqa: BLE001 - already logged by the engine thread
        logger.error("The model failed to load; shutting down.")
        app.state.exit_code = 1
        server = getattr(app.state, "uvicorn_server", None)
        if server is not None:
            server.should_exit = True
        return
    logger.info(
        "Ready: model loaded in %.1f s, %.1f s after start. Serving %s.",
        engine.load_seconds, time.monotonic() - started_at, ", ".join(app.state.serving.model_names),
    )  # fmt: skip


def _add_routes(app: FastAPI, engine: AsyncLLM, serving: OpenAIServing, metrics: ServerMetrics) -> None:
    completion, chat = OpenAIServingCompletion(serving), OpenAIServingChat(serving)
    ready = [Depends(_require_ready)]

    @app.get("/health", tags=["server"], responses={503: {"description": "The model is still loading"}})
    async def health() -> Response:
        """200 once the model is loaded and the engine runs; 503 while loading; 500 if the engine failed."""
        if engine.error is not None:
            return JSONResponse({"status": "failed"}, 500)
        return JSONResponse({"status": "ok" if engine.is_ready else "loading"}, 200 if engine.is_ready else 503)

    @app.get("/version", tags=["server"])
    async def version() -> dict:
        return {"version": kvserve.__version__}

    @app.get("/metrics", tags=["server"], response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
    async def prometheus_metrics() -> Response:
        """Prometheus text format: latency histograms, batch and KV-cache gauges, token and request counters."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, tags=["OpenAI"], dependencies=ready)
    async def models() -> ModelList:
        created, root = int(time.time()), engine.config.model.path
        return ModelList(
            data=[
                ModelCard(id=name, created=created, root=root, max_model_len=serving.max_model_len)
                for name in serving.model_names
            ]
        )

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_GENERATE_RESPONSES,
              tags=["OpenAI"], dependencies=ready)  # fmt: skip
    async def completions(body: CompletionRequest, raw_request: Request) -> Response:
        return await completion.create(body, raw_request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_GENERATE_RESPONSES,
              tags=["OpenAI"], dependencies=ready)  # fmt: skip
    async def chat_completions(body: ChatCompletionRequest, raw_request: Request) -> Response:
        return await chat.create(body, raw_request)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS, tags=["tokenizer"], dependencies=ready)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """Token ids of a prompt, or of a conversation rendered by the chat template."""
        serving.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("Give exactly one of prompt or messages.", param="prompt")
        if body.prompt is not None:
            ids = serving.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            text = serving.render_chat(body.messages, body.add_generation_prompt)
            ids = serving.tokenizer.encode(text, add_special_tokens=False)
        return TokenizeResponse(count=len(ids), max_model_len=serving.max_model_len, tokens=ids)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS, tags=["tokenizer"],
              dependencies=ready)  # fmt: skip
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        serving.check_model(body.model)
        vocab = engine.config.model.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"Token ids must be in [0, {vocab}); got {bad[:5]}.", param="tokens")
        return DetokenizeResponse(prompt=serving.tokenizer.decode(body.tokens))


class APIKeyMiddleware:
    """Pure ASGI (streams pass through untouched): every path but OPEN_PATHS needs `Authorization: Bearer
    <key>`; 401 otherwise. CORS preflights (OPTIONS) pass, as browsers send them without credentials."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if secrets.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        error = APIError(401, "Invalid or missing API key: send `Authorization: Bearer <key>`.", code="invalid_api_key")
        response = render_error(scope["path"], error)
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


def run_server(config: ServerConfig, started_at: float | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status (0 after a graceful shutdown).
    `started_at` (time.monotonic()) is when the process started, for the "ready after" log line."""
    import uvicorn

    _setup_logging(config.log_level)
    app = build_app(config, started_at)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=config.host, port=config.port, log_level=config.log_level,
            timeout_graceful_shutdown=config.shutdown_timeout, access_log=config.log_level == "debug",
        )
    )  # fmt: skip
    app.state.uvicorn_server = server
    # uvicorn handles SIGINT/SIGTERM gracefully, then re-raises the signal to the handler that was there
    # before it; make that handler a no-op so that a graceful shutdown exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    return app.state.exit_code


def _setup_logging(level: str) -> None:
    root = logging.getLogger("kvserve")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level.upper())
