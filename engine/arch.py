"""What the llama-family forward needs to know about a model, read from its HF config, and the
one error type of model loading."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Architectures the llama-family forward implements; config.model_type -> class name is the
# fallback for configs that do not list `architectures` (GGUF-derived configs, hand-written ones).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}


class ModelLoadError(ValueError):
    """A model source that cannot be loaded; the message names the problem and the path/name."""


@dataclass(frozen=True)
class ModelArch:
    """The shape numbers of a llama-family decoder, read from its HF config."""

    architecture: str  # "LlamaForCausalLM" | "Qwen2ForCausalLM" | "MistralForCausalLM"
    num_layers: int  # decoder layers
    hidden_size: int  # model width H
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA: num_heads % num_kv_heads == 0)
    head_dim: int  # per-head width; config.head_dim if present else hidden_size // num_heads
    intermediate_size: int  # MLP width (gate/up output, down input)
    vocab_size: int  # rows of embed_tokens and lm_head
    rms_norm_eps: float  # epsilon of every RMSNorm
    max_position_embeddings: int  # longest sequence the model was trained for
    tie_word_embeddings: bool  # lm_head reuses embed_tokens (then weights may lack lm_head.weight)
    attention_bias: bool  # q/k/v projections have biases (always for Qwen2; Llama: config flag)
    eos_token_ids: tuple[int, ...]  # generation_config.json's eos ids if present, else config's
    bos_token_id: int | None  # config.bos_token_id (None when the model has none)

    @property
    def num_layer_gemm_params(self) -> int:
        """GEMM weights of one decoder layer: the QKV, O, gate/up and down projections."""
        h, d = self.hidden_size, self.head_dim
        qkv = (self.num_heads + 2 * self.num_kv_heads) * d
        return qkv * h + h * self.num_heads * d + 3 * h * self.intermediate_size

    @property
    def num_params(self) -> int:
        """Parameters of the model (embedding, layers, final norm, LM head unless tied)."""
        h = self.hidden_size
        qkv_bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        layer = self.num_layer_gemm_params + 2 * h + (qkv_bias if self.attention_bias else 0)
        embed = self.vocab_size * h
        return embed * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + h

    @staticmethod
    def from_hf_config(config: Any, eos_token_ids: Sequence[int] | None = None) -> ModelArch:
        """Read a `transformers` config of a supported architecture.

        `eos_token_ids` overrides the config's own (load_model passes generation_config.json's,
        which is what `generate()` stops on). Raises ModelLoadError for an unsupported
        architecture or a feature the forward does not implement (non-SiLU MLP, MLP biases).
        """
        architecture = architecture_of(config)
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ModelLoadError(f"hidden_act={config.hidden_act!r} is not supported (only silu)")
        if getattr(config, "mlp_bias", False):
            raise ModelLoadError("mlp_bias=True is not supported")
        num_heads = int(config.num_attention_heads)
        num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
        if num_heads % num_kv_heads:
            raise ModelLoadError(f"num_attention_heads={num_heads} is not a multiple of "
                                 f"num_key_value_heads={num_kv_heads}")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        if eos_token_ids is None:
            eos_token_ids = as_ids(config.eos_token_id)
        return ModelArch(
            architecture=architecture,
            num_layers=int(config.num_hidden_layers),
            hidden_size=int(config.hidden_size),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(head_dim),
            intermediate_size=int(config.intermediate_size),
            vocab_size=int(config.vocab_size),
            rms_norm_eps=float(config.rms_norm_eps),
            max_position_embeddings=int(config.max_position_embeddings),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            # Qwen2's attention always has q/k/v biases and its config has no flag for it.
            attention_bias=architecture == "Qwen2ForCausalLM"
            or bool(getattr(config, "attention_bias", False)),
            eos_token_ids=tuple(eos_token_ids),
            bos_token_id=config.bos_token_id if isinstance(config.bos_token_id, int) else None,
        )


def architecture_of(config: Any) -> str:
    """The supported architecture class name of `config`, or ModelLoadError naming it."""
    listed = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    name = listed[0] if listed else SUPPORTED_ARCHITECTURES.get(model_type or "", model_type)
    if name not in SUPPORTED_ARCHITECTURES.values():
        raise ModelLoadError(f"unsupported architecture {name!r} (supported: "
                             f"{', '.join(SUPPORTED_ARCHITECTURES.values())})")
    return name


def as_ids(value: int | Sequence[int] | None) -> tuple[int, ...]:
    """An eos/bos id field (int, list or None) as a tuple."""
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)
