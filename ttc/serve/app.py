"""The FastAPI application: routes, error handlers, and the runtime they share (`app.state.runtime`).

    app = create_app(ttc.load("smollm2-135m"), Settings(model_name="smollm2-135m"))

GET /health is 200 with the queue and KV counts while serving, 503 while draining (SIGTERM); GET
/v1/models lists the one served model. The endpoint families live in completions.py and chat.py.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ttc.budget import CannotAttempt
from ttc.decoder.cache import PoolExhausted
from ttc.serve import chat, completions, errors
from ttc.serve.protocol import ModelCard, ModelList
from ttc.serve.request_engine import ClientGone
from ttc.serve.runtime import Runtime, Settings

__all__ = ["create_app"]


def create_app(model, settings: Settings) -> FastAPI:
    runtime = Runtime(model, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        runtime.admission.drain()
        runtime.close()  # uvicorn has waited for the in-flight requests; the workers are idle

    app = FastAPI(title="ttc serve", lifespan=lifespan)
    app.state.runtime = runtime
    errors.install(app)

    @app.exception_handler(PoolExhausted)
    async def _pool(request: Request, exc: PoolExhausted):  # a strategy's KV outgrew its reservation
        return errors.overloaded(str(exc), settings.retry_after_s).response()

    @app.exception_handler(CannotAttempt)
    async def _cannot(request: Request, exc: CannotAttempt):  # a prompt too long, a budget too small
        return errors.bad_request(str(exc)).response()

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody is listening; nginx's "client closed request"

    @app.get("/health")
    async def health():
        stats = runtime.stats()
        draining = runtime.admission.draining
        return JSONResponse({"status": "draining" if draining else "ok", **stats}, status_code=503 if draining else 200)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=settings.model_name, max_model_len=runtime.max_position)])

    app.include_router(completions.router)
    app.include_router(chat.router)
    return app
