"""The OpenAI-compatible HTTP server: a FastAPI app over AsyncLLM (build_app), run by uvicorn (serve)."""

import hmac
import threading

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from mixr.engine.async_engine import AsyncLLM
from mixr.engine.distributed import WorkerError
from mixr.safety import SafetyConfig
from mixr.serve.endpoints import chat_completions, completions
from mixr.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body
from mixr.serve.state import ServerState

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def _error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def _param(loc: tuple) -> str | None:
    """A pydantic error location as OpenAI names parameters: messages[0].role."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}" if out else part
        else:
            break  # pydantic's union-member tags ("list[int]", "function-after[...]")
    return out or None


class _Gate:
    """ASGI middleware in front of every route: the API key for /v1, and request counts by endpoint/status."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "/v1/models" if path.startswith("/v1/models/") else "other"
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            key = self.state.api_key
            if key is not None and (path == "/v1" or path.startswith("/v1/")):
                auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
                scheme, _, token = auth.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                    message = "Incorrect API key provided." if auth else \
                        "Missing API key: send it as the header `Authorization: Bearer KEY`."
                    response = _error(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                    return await response(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        finally:
            self.state.metrics.requests.inc(endpoint, status)


def build_app(engine: AsyncLLM, model_name: str, api_key: str | None = None, max_queue: int = 256,
              safety: SafetyConfig | None = None) -> FastAPI:
    """The OpenAI-compatible app over an AsyncLLM. api_key: required as a bearer token on every /v1 route;
    max_queue: generation requests held at once (waiting + running), past which new ones get 429;
    safety: the input and output filters, audit and watermark applied to every generation request."""
    if max_queue < 1:
        raise ValueError(f"max_queue must be >= 1, got {max_queue}")
    state = ServerState(engine, model_name, api_key, max_queue, safety)
    app = FastAPI(title="mixr", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.mixr = state
    app.add_middleware(_Gate, state=state)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return _error(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        err = (e.errors() or [{}])[0]
        loc = tuple(err.get("loc", ()))
        loc = loc[1:] if loc[:1] == ("body",) else loc
        msg = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            return _error(400, f"The request body is not valid JSON: {err.get('ctx', {}).get('error', msg)}.")
        param = _param(loc)
        if param is None:  # the body as a whole: not an object, or not sent as JSON
            return _error(400, f"The request body must be a JSON object sent with Content-Type: application/json "
                          f"({msg}).")
        return _error(400, f"{param}: {msg}", param=param)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None,
                      headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        return _error(500, "The server failed to handle the request.", type="server_error")

    @app.post("/v1/chat/completions")
    async def _chat(req: ChatCompletionRequest, request: Request) -> Response:
        return await chat_completions(state, req, request)

    @app.post("/v1/completions")
    async def _completions(req: CompletionRequest, request: Request) -> Response:
        return await completions(state, req, request)

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "mixr",
                "max_model_len": state.engine.max_model_len}

    @app.get("/v1/models")
    async def _models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def _model(model: str) -> dict:
        state.check_model(model)
        return model_card()

    @app.get("/health")
    async def _health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def _metrics() -> Response:
        sched = state.engine.scheduler
        bm = sched.block_manager
        gauges = [("mixr_requests_in_flight", "Generation requests admitted and not finished (waiting + running).",
                   state.in_flight),
                  ("mixr_max_queue", "Requests held at once before new ones get 429.", state.max_queue),
                  ("mixr_sequences_running", "Sequences in the engine's running batch.", len(sched.running)),
                  ("mixr_sequences_waiting", "Sequences waiting in the engine's queue.", len(sched.waiting)),
                  ("mixr_kv_cache_usage_ratio", "Fraction of KV cache blocks held by sequences.", bm.usage),
                  ("mixr_kv_cache_blocks", "KV cache blocks in all.", bm.num_blocks)]
        return Response(state.metrics.render(gauges), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def serve(engine: AsyncLLM, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_queue: int = 256, shutdown_timeout: float = 30.0, log_level: str = "info",
          safety: SafetyConfig | None = None) -> None:
    """Serve until SIGINT/SIGTERM. Shutdown is uvicorn's graceful one: the socket closes, in-flight requests get
    shutdown_timeout seconds to finish, then their tasks are cancelled (which aborts them in the engine).
    A tensor-parallel engine whose worker fails shuts the server down the same way, then raises WorkerError."""
    app = build_app(engine, model_name, api_key, max_queue, safety)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout)
    server = uvicorn.Server(config)
    workers = getattr(engine.engine, "workers", None)
    if workers is not None:  # every step after a failure fails: stop serving rather than answer 500s
        def stop_on_failure() -> None:
            workers.failed.wait()
            server.should_exit = True
        threading.Thread(target=stop_on_failure, name="mixr-tp-failure", daemon=True).start()
    server.run()
    if workers is not None and workers.error is not None:
        raise WorkerError(workers.error)
