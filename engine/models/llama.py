"""The Llama-family decoder (Llama, Qwen2, Mistral) written as kernel launches on an npu_sim Device.

Weights are fused at load time the way the kernels consume them: q/k/v into one (Hq + 2 Hkv) D x H
matrix (one GEMM instead of three), gate/up into one 2I x H matrix. The forward pass holds no
math of its own: every number comes out of a `Device.launch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine.lowering import StepPlan
from engine.models.arch import ModelArch
from engine.models.loader import LoadedModel
from npu_sim.device import Device


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's weights, fused for the kernels."""

    input_norm: torch.Tensor  # (H,)
    qkv: torch.Tensor  # ((Hq + 2 Hkv) D, H)
    qkv_bias: torch.Tensor | None  # ((Hq + 2 Hkv) D,) for Qwen2, else None
    o_proj: torch.Tensor  # (H, Hq D)
    o_proj_bias: torch.Tensor | None  # (H,) for Llama with attention_bias, else None
    post_attn_norm: torch.Tensor  # (H,)
    gate_up: torch.Tensor  # (2 I, H)
    down: torch.Tensor  # (H, I)


@dataclass(frozen=True)
class StepInputs:
    """Per-step tensors shared by every layer."""

    token_ids: torch.Tensor  # (T,) int64
    cos: torch.Tensor  # (T, D) RoPE cos at each token's position
    sin: torch.Tensor  # (T, D)
    slot_mapping: torch.Tensor  # (T,) int64 flat cache slot = block_id * block_size + offset
    sample_rows: torch.Tensor  # (num_sampled,) int64 rows of the batch whose next token is sampled


class LlamaModel:
    """Weights plus the forward pass. KV caches are passed in, owned by the runner."""

    def __init__(self, loaded: LoadedModel, dtype: torch.dtype) -> None:
        self.arch: ModelArch = loaded.arch
        self.dtype = dtype
        w = {name: t.to(dtype) for name, t in loaded.weights.items()}
        self.embed = w["model.embed_tokens.weight"]  # (V, H)
        self.final_norm = w["model.norm.weight"]
        self.lm_head = self.embed if self.arch.tie_word_embeddings else w["lm_head.weight"]
        self.layers = [self._layer(w, f"model.layers.{i}.") for i in range(self.arch.num_layers)]
        inv_freq, self.rope_scaling = _rope_inv_freq(loaded)
        self.inv_freq = inv_freq.float()  # (D / 2,)

    def _layer(self, w: dict[str, torch.Tensor], p: str) -> LayerWeights:
        attn, mlp = p + "self_attn.", p + "mlp."
        bias = None
        if self.arch.attention_bias:
            bias = torch.cat([w[attn + f"{x}_proj.bias"] for x in "qkv"])
        return LayerWeights(
            input_norm=w[p + "input_layernorm.weight"],
            qkv=torch.cat([w[attn + f"{x}_proj.weight"] for x in "qkv"]).contiguous(),
            qkv_bias=bias,
            o_proj=w[attn + "o_proj.weight"],
            o_proj_bias=w.get(attn + "o_proj.bias"),
            post_attn_norm=w[p + "post_attention_layernorm.weight"],
            gate_up=torch.cat([w[mlp + "gate_proj.weight"], w[mlp + "up_proj.weight"]]),
            down=w[mlp + "down_proj.weight"],
        )

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, D) for int64 positions (T,), computed in fp32 as transformers does."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, D / 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.rope_scaling, emb.sin() * self.rope_scaling
        return cos.to(self.dtype), sin.to(self.dtype)

    def forward(self, device: Device, plan: StepPlan, inputs: StepInputs,
                k_caches: torch.Tensor, v_caches: torch.Tensor) -> torch.Tensor | None:
        """Run one step; returns logits (num_sampled, V) in fp32, or None if nothing is sampled.

        k_caches, v_caches: (num_layers, NB, BS, Hkv, D), written in place at slot_mapping.
        """
        a, lp = self.arch, plan.layer
        t, d = plan.num_tokens, a.head_dim
        q_cols, kv_cols = a.num_heads * d, a.num_kv_heads * d
        eps = a.rms_norm_eps
        residual = device.launch(plan.embed, table=self.embed, token_ids=inputs.token_ids)
        x = device.launch(plan.first_norm, x=residual, weight=self.layers[0].input_norm, eps=eps)
        down = x
        for i, layer in enumerate(self.layers):
            qkv = device.launch(lp.qkv_proj, x=x, w=layer.qkv, bias=layer.qkv_bias)
            q = qkv[:, :q_cols].view(t, a.num_heads, d)
            k = qkv[:, q_cols:q_cols + kv_cols].view(t, a.num_kv_heads, d)
            v = qkv[:, q_cols + kv_cols:].view(t, a.num_kv_heads, d)
            device.launch(lp.rope, q=q, k=k, cos=inputs.cos, sin=inputs.sin)
            device.launch(lp.kv_write, k=k, v=v, k_cache=k_caches[i], v_cache=v_caches[i],
                          slot_mapping=inputs.slot_mapping)
            attn = device.launch(lp.attention, q=q, k_cache=k_caches[i], v_cache=v_caches[i])
            o = device.launch(lp.o_proj, x=attn.view(t, q_cols), w=layer.o_proj,
                              bias=layer.o_proj_bias)
            x = device.launch(lp.post_attn_norm, x=o, residual=residual,
                              weight=layer.post_attn_norm, eps=eps)
            gate_up = device.launch(lp.gate_up_proj, x=x, w=layer.gate_up)
            act = device.launch(lp.silu_mul, gate_up=gate_up)
            down = device.launch(lp.down_proj, x=act, w=layer.down)
            if i + 1 < len(self.layers):
                x = device.launch(lp.next_input_norm, x=down, residual=residual,
                                  weight=self.layers[i + 1].input_norm, eps=eps)
        if plan.lm_head is None:
            return None
        # Only the sampled rows go on: final norm and LM head run on num_sampled rows, not T.
        rows = inputs.sample_rows
        x = device.launch(plan.final_norm, x=down[rows], residual=residual[rows],
                          weight=self.final_norm, eps=eps)
        return device.launch(plan.lm_head, x=x, w=self.lm_head).float()


def _rope_inv_freq(loaded: LoadedModel) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D / 2,) and attention scaling, as transformers derives them."""
    config = loaded.hf_config
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":  # llama3, yarn, linear, ...: transformers' own formulas
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        return inv_freq, float(scaling)
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    d = loaded.arch.head_dim
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float) / d)), 1.0
