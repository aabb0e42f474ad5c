"""The OpenAI-compatible gateway: routes, error handlers and start-up, nothing else.

``python -m api --triton-url HOST:PORT [--host H] [--port N] [--model-name NAME]``.
It talks to Triton's ``gpt2`` model at ``--triton-url`` (the front door's gRPC port, or one
Triton's loopback port: ``make serve`` with one replica) and forwards each caller's
``Authorization`` header with its request; its own calls (health, the model's config) use
``$API_KEY`` when set.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from api import errors
from api.errors import ApiError
from api.protocol import ChatCompletionRequest, CompletionRequest
from api.serving_chat import OpenAIServingChat
from api.serving_completions import OpenAIServingCompletion
from api.serving_models import ServingModels
from api.triton import TritonClient, TritonError

log = logging.getLogger("api")
DISCONNECT_POLL_S = 0.5


@dataclass(frozen=True)
class Settings:
    triton_url: str = "127.0.0.1:8001"  # the front door's gRPC port, or one Triton's
    host: str = "127.0.0.1"
    port: int = 8300
    model_name: str | None = None  # None: the gpt2 model's model_name parameter
    triton_model: str = "gpt2"
    log_level: str = "info"


class EventStream(StreamingResponse):
    """Server-sent events. Closes its generator however the response ends, a client that
    went away included, so the Triton requests behind it are cancelled at once rather
    than when the generator is garbage-collected."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _unless_disconnected(request: Request, work):
    """Await ``work`` (a whole, non-streamed answer takes as long as its generation), and
    cancel it when the client goes away: its Triton requests are then cancelled too,
    instead of generating for nobody. (A streamed answer returns at once; its stream
    closes itself on a disconnect.)"""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ApiError(499, "the client closed the connection")
    finally:
        if not task.done():
            task.cancel()


def _answer(result) -> JSONResponse | EventStream:
    if isinstance(result, AsyncIterator):
        return EventStream(result, headers={"Cache-Control": "no-cache"})
    return JSONResponse(result.model_dump())


def build_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # grpc.aio channels belong to the event loop that creates them: made here
        triton = TritonClient(
            settings.triton_url, settings.triton_model, os.environ.get("API_KEY") or None
        )
        models = ServingModels(triton, settings.model_name)
        app.state.triton = triton
        app.state.models = models
        app.state.completions = OpenAIServingCompletion(triton, models)
        app.state.chat = OpenAIServingChat(triton, models)
        log.info("gateway for Triton at %s (model %s)", settings.triton_url, settings.triton_model)
        watch = asyncio.create_task(triton.watch_readiness())
        yield
        watch.cancel()
        await triton.close()

    app = FastAPI(title="GPT-2 on Triton: OpenAI-compatible API", lifespan=lifespan)
    for kind in (ApiError, TritonError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(kind, errors.handle)

    @app.get("/health")
    async def health() -> JSONResponse:
        if await app.state.triton.is_ready():
            return JSONResponse({"status": "ok"})
        return errors.error_response(
            ApiError(503, f"Triton's {settings.triton_model} model is not ready")
        )

    @app.get("/health/live")
    async def live() -> JSONResponse:
        """The process answers: what the front door health-checks (readiness is /health)."""
        return JSONResponse({"status": "live"})

    @app.get("/v1/models")
    async def list_models(authorization: str | None = Header(None)) -> JSONResponse:
        return JSONResponse((await app.state.models.list(authorization)).model_dump())

    @app.get("/v1/models/{model}")
    async def retrieve_model(model: str, authorization: str | None = Header(None)):
        await app.state.models.check(model, authorization)
        return JSONResponse((await app.state.models.card(authorization)).model_dump())

    @app.post("/v1/completions")
    async def completions(
        request: CompletionRequest, raw: Request, authorization: str | None = Header(None)
    ):
        work = app.state.completions.create(request, authorization)
        return _answer(await _unless_disconnected(raw, work))

    @app.post("/v1/chat/completions")
    async def chat_completions(
        request: ChatCompletionRequest, raw: Request, authorization: str | None = Header(None)
    ):
        work = app.state.chat.create(request, authorization)
        return _answer(await _unless_disconnected(raw, work))

    return app


def parse_args(argv: list[str] | None = None) -> Settings:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m api", description="OpenAI-compatible API for Triton's gpt2 model"
    )
    parser.add_argument(
        "--triton-url",
        default=defaults.triton_url,
        help="Triton's gRPC address, HOST:PORT (the front door's, e.g. make serve's GRPC_PORT)",
    )
    parser.add_argument("--host", default=defaults.host, help="address to listen on")
    parser.add_argument("--port", type=int, default=defaults.port, help="port to listen on")
    parser.add_argument(
        "--model-name",
        default=None,
        help="the model name clients send (default: the gpt2 model's model_name parameter)",
    )
    parser.add_argument(
        "--triton-model", default=defaults.triton_model, help="the Triton model to call"
    )
    parser.add_argument(
        "--log-level",
        default=defaults.log_level,
        choices=["critical", "error", "warning", "info", "debug"],
    )
    args = parser.parse_args(argv)
    return Settings(
        triton_url=args.triton_url,
        host=args.host,
        port=args.port,
        model_name=args.model_name,
        triton_model=args.triton_model,
        log_level=args.log_level,
    )


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        build_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,  # open streams are cut (and cancelled) after this
    )
    return 0
