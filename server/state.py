"""What the routes share: the engine, the config, the model's identity, the serving objects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

from engine.async_engine import AsyncEngine
from server.config import ServerConfig
from server.errors import NotFoundError
from server.metrics import ServerMetrics

if TYPE_CHECKING:
    from server.serving import OpenAIServing


@dataclass(frozen=True)
class ModelInfo:
    """The one model this server serves."""

    name: str  # the served name (what clients send and see)
    root: str  # the --model the engine loaded (also accepted as a name)
    max_model_len: int  # prompt + output tokens at most
    vocab_size: int  # token ids are in [0, vocab_size)
    created: int  # unix seconds when the server started

    def check(self, requested: str | None) -> None:
        """Raise NotFoundError (404) unless `requested` names this model (None does)."""
        if requested is not None and requested not in (self.name, self.root):
            shown = requested if len(requested) <= 256 else requested[:256] + "..."
            raise NotFoundError(f"The model `{shown}` does not exist.", param="model",
                                code="model_not_found")


@dataclass(frozen=True)
class ServerState:
    """Everything a route needs; one per app, at `app.state.xyserve`."""

    config: ServerConfig
    engine: AsyncEngine
    tokenizer: Any  # the engine's Hugging Face tokenizer
    model: ModelInfo
    metrics: ServerMetrics
    completions: OpenAIServing  # POST /v1/completions
    chat: OpenAIServing  # POST /v1/chat/completions


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.xyserve
    return state


State = Annotated[ServerState, Depends(get_state)]
