"""GET /metrics: Prometheus text exposition (open, like /health)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from server.state import State

router = APIRouter()


@router.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(content=state.metrics.render(), media_type=state.metrics.content_type)
