"""GET /metrics: Prometheus text exposition (open, like /health)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from server.state import State

router = APIRouter()


@router.get("/metrics", response_class=Response, responses={200: {
    "description": "Prometheus text exposition",
    "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(state: State) -> Response:
    return Response(content=state.metrics.render(), media_type=state.metrics.content_type)
