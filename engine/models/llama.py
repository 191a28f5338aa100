"""The Llama-family decoder (Llama, Qwen2, Mistral) written as kernel launches on an npu_sim Device.

Weights are fused at load time the way the kernels consume them: q/k/v into one (Hq + 2 Hkv) D x H
matrix (one GEMM instead of three), gate/up into one 2I x H matrix, and every GEMM weight is
pre-packed for the CPU's fast path (`Device.pack_weight`). The forward pass holds no
math of its own: every number comes out of the device, a `Device.launch` per kernel, or, where the
fast path's C kernels take the whole step, one `Device.replay` of every layer's launches
(npu_sim.kernels.replay: the same kernels, without a Python walk over ten launches a layer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine.arch import ModelArch
from engine.lowering import StepPlan, layer_launches
from engine.models.loader import LoadedModel
from npu_sim.device import Device
from npu_sim.kernels import PackedWeight
from npu_sim.kernels.replay import LayerStack, StackLayer, StepOperands

Weight = torch.Tensor | PackedWeight  # a GEMM weight (N, K), packed where the CPU allows


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's weights, fused for the kernels."""

    input_norm: torch.Tensor  # (H,)
    qkv: Weight  # ((Hq + 2 Hkv) D, H)
    qkv_bias: torch.Tensor | None  # ((Hq + 2 Hkv) D,) for Qwen2, else None
    o_proj: Weight  # (H, Hq D)
    o_proj_bias: torch.Tensor | None  # (H,) for Llama with attention_bias, else None
    post_attn_norm: torch.Tensor  # (H,)
    gate_up: Weight  # (2 I, H)
    down: Weight  # (H, I)


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

    def __init__(self, loaded: LoadedModel, dtype: torch.dtype, device: Device,
                 weight_format: str = "fp32") -> None:
        """Weights of `loaded` in `dtype`, GEMM weights packed for `device`'s fast path in
        `weight_format`: fp32, bf16 (rounded), gguf (each GEMM weight in the Q4_1 / Q8_0
        blocks it ships in, read from `loaded.gguf_path`; the rest fp32), or gguf+bf16 (bf16,
        and the blocks for steps of at most LONE_STREAM_ROWS rows)."""
        self.arch: ModelArch = loaded.arch
        self.dtype = dtype
        # Views of the checkpoint where the dtype matches (a no-op .to()). A safetensors file is
        # mapped, and one tensor still viewing it keeps every page of it read so far resident
        # (the q/k/v and gate/up originals too, which live on fused): what is kept as read is
        # copied out (`owned`), the GEMM weights live on in their packed copies.
        w = {name: t.to(dtype) for name, t in loaded.weights.items()}

        def own(name: str) -> torch.Tensor:
            return _owned(w, loaded, name)

        self.embed = own("model.embed_tokens.weight")  # (V, H)
        self.final_norm = own("model.norm.weight")
        pack = _Packer(device, w, weight_format, loaded, dtype)
        self.lm_head = pack("model.embed_tokens.weight" if self.arch.tie_word_embeddings
                            else "lm_head.weight")  # (V, H)
        self.layers = [self._layer(w, own, f"model.layers.{i}.", pack)
                       for i in range(self.arch.num_layers)]
        self.weight_formats = pack.used  # the formats the GEMM weights ended up in
        inv_freq, self.rope_scaling = _rope_inv_freq(loaded)
        self.inv_freq = inv_freq.float()  # (D / 2,)
        # cos, sin (P, D) of positions [0, P), grown as positions come (rope_tables)
        self._rope_cos = self._rope_sin = torch.empty(0, 2 * len(inv_freq), dtype=dtype)
        # the layers prepared for one-call replay on the caches they were prepared with
        self._stack: LayerStack | None = None
        self._stack_caches: object = None

    def _layer(self, w: dict[str, torch.Tensor], own: Callable[[str], torch.Tensor], p: str,
               pack: _Packer) -> LayerWeights:
        attn, mlp = p + "self_attn.", p + "mlp."
        bias = None
        if self.arch.attention_bias:
            bias = torch.cat([w[attn + f"{x}_proj.bias"] for x in "qkv"])
        o_bias = attn + "o_proj.bias"
        return LayerWeights(
            input_norm=own(p + "input_layernorm.weight"),
            qkv=pack(*(attn + f"{x}_proj.weight" for x in "qkv")),
            qkv_bias=bias,
            o_proj=pack(attn + "o_proj.weight"),
            o_proj_bias=own(o_bias) if o_bias in w else None,
            post_attn_norm=own(p + "post_attention_layernorm.weight"),
            gate_up=pack(mlp + "gate_proj.weight", mlp + "up_proj.weight"),
            down=pack(mlp + "down_proj.weight"),
        )

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, D) for int64 positions (T,) (each >= 0), computed in fp32 as
        transformers does.

        Rows of tables kept for every position so far, grown to the next power of two past the
        largest asked for: torch's cos and sin of a decode step's few rows wake its second
        OpenMP thread (75 us each on a 2-core Xeon, for ~1 us of arithmetic), where a lookup
        takes 2 us; an element is computed by the same kernel either way, the same float bit for
        bit."""
        top = int(positions.max()) + 1 if len(positions) else 0
        if top > len(self._rope_cos):
            size = max(1024, 1 << (top - 1).bit_length())
            freqs = torch.arange(size).float()[:, None] * self.inv_freq[None, :]  # (P, D / 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rope_cos = (emb.cos() * self.rope_scaling).to(self.dtype)
            self._rope_sin = (emb.sin() * self.rope_scaling).to(self.dtype)
        return self._rope_cos.index_select(0, positions), self._rope_sin.index_select(0, positions)

    def forward(self, device: Device, plan: StepPlan, inputs: StepInputs,
                k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor],
                ) -> torch.Tensor | None:
        """Run one step; returns logits (num_sampled, V) in fp32, or None if nothing is sampled.

        k_caches, v_caches: per layer (NB, BS, Hkv, D) (a (num_layers, ...) tensor or a list of
        its layers), written in place at slot_mapping.
        """
        launch, eps = device.launch, self.arch.rms_norm_eps
        residual = launch(plan.embed, table=self.embed, token_ids=inputs.token_ids)
        x = launch(plan.first_norm, x=residual, weight=self.layers[0].input_norm, eps=eps)
        down = self._replay(device, plan, inputs, residual, x, k_caches, v_caches)
        if down is None:
            down = self._launch_layers(device, plan, inputs, residual, x, k_caches, v_caches)
        if plan.lm_head is None:
            return None
        # Only the sampled rows go on: final norm and LM head run on num_sampled rows, not T.
        rows = inputs.sample_rows
        if len(rows) < plan.num_tokens:  # (a pure decode step samples every row: no gather)
            down, residual = down.index_select(0, rows), residual.index_select(0, rows)
        x = launch(plan.final_norm, x=down, residual=residual, weight=self.final_norm, eps=eps)
        return launch(plan.lm_head, x=x, w=self.lm_head).float()

    def _launch_layers(self, device: Device, plan: StepPlan, inputs: StepInputs,
                       residual: torch.Tensor, x: torch.Tensor, k_caches: Sequence[torch.Tensor],
                       v_caches: Sequence[torch.Tensor]) -> torch.Tensor:
        """The layers launch by launch: the last layer's down projection (T, H); residual
        (T, H) is updated in place."""
        a, lp, launch = self.arch, plan.layer, device.launch
        t, d = plan.num_tokens, a.head_dim
        heads = (a.num_heads, a.num_kv_heads, a.num_kv_heads)
        q_cols, eps = a.num_heads * d, a.rms_norm_eps
        cos, sin, slot_mapping = inputs.cos, inputs.sin, inputs.slot_mapping
        down = x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = k_caches[i], v_caches[i]
            qkv = launch(lp.qkv_proj, x=x, w=layer.qkv, bias=layer.qkv_bias)
            q, k, v = qkv.view(t, -1, d).split(heads, dim=1)  # (T, H*, D) views of one row
            launch(lp.rope, q=q, k=k, cos=cos, sin=sin)
            launch(lp.kv_write, k=k, v=v, k_cache=k_cache, v_cache=v_cache,
                   slot_mapping=slot_mapping)
            attn = launch(lp.attention, q=q, k_cache=k_cache, v_cache=v_cache)
            o = launch(lp.o_proj, x=attn.view(t, q_cols), w=layer.o_proj, bias=layer.o_proj_bias)
            x = launch(lp.post_attn_norm, x=o, residual=residual, weight=layer.post_attn_norm,
                       eps=eps)
            gate_up = launch(lp.gate_up_proj, x=x, w=layer.gate_up)
            act = launch(lp.silu_mul, gate_up=gate_up)
            down = launch(lp.down_proj, x=act, w=layer.down)
            if i < last:
                x = launch(lp.next_input_norm, x=down, residual=residual,
                           weight=self.layers[i + 1].input_norm, eps=eps)
        return down

    def _replay(self, device: Device, plan: StepPlan, inputs: StepInputs,
                residual: torch.Tensor, x: torch.Tensor, k_caches: Sequence[torch.Tensor],
                v_caches: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """Every layer in one replayed call (npu_sim.kernels.replay), the same launches with
        the same numbers: the last layer's down projection, or None where the device does not
        replay this step (then the layers launch one by one)."""
        if self._stack_caches is not k_caches:  # the runner passes the same sequence each step
            self._stack_caches = k_caches
            self._stack = LayerStack.prepare(
                [self._stack_layer(i, k_caches[i], v_caches[i]) for i in range(len(self.layers))],
                self.arch.num_heads, self.arch.rms_norm_eps)
        lp = plan.layer
        body = layer_launches(lp)
        if self._stack is None or len(body) != len(_REPLAYED) or any(
                kernel is not getattr(lp, name)
                for kernel, name in zip(body, _REPLAYED, strict=True)):
            return None  # baseline pads, split attention, collectives: launch by launch
        launches = ((body, len(self.layers) - 1), (body[:-1], 1))  # the last: no next norm
        return device.replay(self._stack, launches, lp.attention, StepOperands(
            residual=residual, x=x, cos=inputs.cos, sin=inputs.sin,
            slot_mapping=inputs.slot_mapping))

    def _stack_layer(self, i: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> StackLayer:
        layer = self.layers[i]
        return StackLayer(qkv=layer.qkv, qkv_bias=layer.qkv_bias, o_proj=layer.o_proj,
                          o_proj_bias=layer.o_proj_bias, post_attn_norm=layer.post_attn_norm,
                          gate_up=layer.gate_up, down=layer.down,
                          next_norm=self.layers[i + 1].input_norm
                          if i + 1 < len(self.layers) else None,
                          k_cache=k_cache, v_cache=v_cache)


# The launches of one layer a replay stands for, in order (engine.lowering.layer_launches).
_REPLAYED = ("qkv_proj", "rope", "kv_write", "attention", "o_proj", "post_attn_norm",
             "gate_up_proj", "silu_mul", "down_proj", "next_input_norm")


# Rows up to which a gguf+bf16 weight multiplies on its 4-bit blocks: a lone stream's decode
# steps read a third of bf16's bytes (served on an AMX Xeon: 6.5-6.8 against 11.3-11.4 ms a
# token), larger steps run on bf16 AMX tiles (16 streams: 768-794 against 422-428 tok/s).
LONE_STREAM_ROWS = 1


def with_lone_stream_blocks(bf16: Weight, blocks: Weight | None) -> Weight:
    """A gguf+bf16 weight: `bf16` (`blocks` decoded and rounded), its products of at most
    LONE_STREAM_ROWS rows taken by `blocks` (the same weight's GGUF blocks, packed), and on AMX
    those of a decode batch too (the blocks read as bf16: PackedWeight.with_small); `bf16`
    alone where the weight has no blocks or either is not packed (no C kernels)."""
    if not isinstance(bf16, PackedWeight) or not isinstance(blocks, PackedWeight):
        return bf16
    return bf16.with_small(blocks, LONE_STREAM_ROWS, rounded_from_small=True)


class _Packer:
    """GEMM weights (several fused along N) packed in one weight format for the device."""

    def __init__(self, device: Device, weights: dict[str, torch.Tensor], weight_format: str,
                 loaded: LoadedModel, activations: torch.dtype) -> None:
        self.device, self.weights, self.weight_format = device, weights, weight_format
        self.activations = activations
        self.quantized: dict[str, Any] = {}
        if weight_format in ("gguf", "gguf+bf16"):
            if loaded.gguf_path is None:
                raise ValueError(f"weight format gguf: {loaded.name} does not come from a GGUF "
                                 f"file")
            from engine.models.gguf_weights import read_quantized

            self.quantized = read_quantized(loaded.gguf_path, loaded.arch)
        self.used: set[str] = set()

    def __call__(self, *names: str) -> Weight:
        if self.weight_format == "gguf+bf16":  # bf16, and the blocks for a lone stream
            return with_lone_stream_blocks(self._dense(names, "bf16"), self._blocks(names))
        blocks = self._blocks(names) if self.weight_format == "gguf" else None
        if blocks is not None:
            return blocks
        return self._dense(names, "fp32" if self.weight_format == "gguf" else self.weight_format)

    def _blocks(self, names: tuple[str, ...]) -> Weight | None:
        """The weights' GGUF blocks as they ship, packed; None where they have none (or not
        all of one format)."""
        parts = [self.quantized.get(name) for name in names]
        if not all(parts) or len({q.fmt for q in parts}) != 1:
            return None
        from npu_sim.kernels.quant import QuantizedWeight

        self.used.add(parts[0].fmt)
        return self._lean(self.device.pack_quantized(QuantizedWeight.stack(parts)))

    def _dense(self, names: tuple[str, ...], fmt: str) -> Weight:
        """The weights (fused along N) packed in `fmt`, fp32 or bf16."""
        self.used.add(fmt)
        w = self.weights[names[0]] if len(names) == 1 else torch.cat(
            [self.weights[name] for name in names])
        return self._lean(self.device.pack_weight(w, fmt))

    def _lean(self, weight: Weight) -> Weight:
        # Only the reference path (strict) reads a GEMM weight's plain copy: a served model
        # keeps its fast-path copies alone (npu_sim.kernels.gemm.PackedWeight.without_plain).
        if self.device.strict or not isinstance(weight, PackedWeight):
            return weight
        return weight.without_plain(self.activations)


def _owned(w: dict[str, torch.Tensor], loaded: LoadedModel, name: str) -> torch.Tensor:
    """w[name], copied into memory of its own where it still views the checkpoint's tensor."""
    t, source = w[name], loaded.weights[name]
    if t.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        return t.clone()
    return t


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
