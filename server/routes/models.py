"""GET /v1/models, /v1/models/{id}, /version (behind the API key) and /health (open)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from engine.async_engine import AdmissionClosedError
from server import __version__
from server.errors import ServiceUnavailableError
from server.protocol_responses import ModelCard, ModelList, VersionResponse
from server.routes import ERROR_RESPONSES
from server.state import ModelInfo, State

router = APIRouter(responses=ERROR_RESPONSES)
open_router = APIRouter()


def _card(model: ModelInfo) -> ModelCard:
    return ModelCard(id=model.name, created=model.created, root=model.root,
                     max_model_len=model.max_model_len)


# HEAD answers as GET does, without the body: load balancers probe with it. (Not in the schema: one
# operation per route and method there, and HEAD's is GET's.)
@router.get("/v1/models")
@router.head("/v1/models", include_in_schema=False)
async def list_models(state: State) -> ModelList:
    return ModelList(data=[_card(state.model)])


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, state: State) -> ModelCard:
    state.model.check(model_id)
    return _card(state.model)


@router.get("/version")
async def version() -> VersionResponse:
    return VersionResponse(version=__version__)


@open_router.get("/health", response_class=Response,
                 responses={200: {"description": "ready (empty body)"}, 503: ERROR_RESPONSES[503]})
@open_router.head("/health", response_class=Response, include_in_schema=False)
async def health(state: State) -> Response:
    """200 while the engine loop runs and takes requests; 503 once it has stopped, or while
    the server drains for shutdown (so a load balancer stops sending it requests; that 503
    carries Retry-After)."""
    if not state.engine.is_alive:
        raise ServiceUnavailableError("the engine loop is not running")
    if state.engine.admission_closed is not None:
        raise AdmissionClosedError(state.engine.admission_closed)
    return Response(status_code=200)
