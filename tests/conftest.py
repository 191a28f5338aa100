"""Shared fixtures: tiny random-weight models of each supported architecture and the default model.

The tiny models (2 layers, hidden 64, 4 heads, 2 KV heads, head dim 16, intermediate 128, 512
positions) use the real SmolLM2 tokenizer (vocab 49152, chat template), so prompts, chat
templates and detokenization behave as with the default model while a forward costs
microseconds. Their weights are seeded and perturbed away from the trivial init (norm weights
around 1, nonzero biases) so a kernel that drops a norm weight or a bias changes the numbers.
Each is written once per session; the default model is converted once per machine.
"""

from __future__ import annotations

import pathlib
from typing import Any

import gguf
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from engine.models import gguf_convert
from engine.models.loader import default_cache_dir, preset_gguf_path, resolve_model_path

DEFAULT_MODEL = "smollm2-135m-instruct"

# Shape of every tiny model; vocab and special token ids come from the tokenizer.
TINY_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    # Weights of std 0.1 (HF's default is 0.02) give logits with a clear argmax, so greedy
    # comparisons between implementations are not decided by rounding noise.
    "initializer_range": 0.1,
}


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The SmolLM2 tokenizer: from the converted default model when the cache has it (0.1 s),
    else extracted from the preset's GGUF (~3 s)."""
    cached = default_cache_dir() / "models" / DEFAULT_MODEL
    if gguf_convert.is_complete(cached):
        return transformers.AutoTokenizer.from_pretrained(cached, local_files_only=True)
    path = preset_gguf_path(DEFAULT_MODEL)
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                                      local_files_only=True)


def _save_tiny(out: pathlib.Path, config: transformers.PretrainedConfig,
               tokenizer: transformers.PreTrainedTokenizerFast,
               generation_eos: list[int] | None = None) -> pathlib.Path:
    """Build a seeded random model of `config`, perturb it, save it with `tokenizer` to `out`."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    if generation_eos is not None:
        model.generation_config.eos_token_id = generation_eos
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _tiny_config(config_cls: type[transformers.PretrainedConfig], architecture: str,
                 tokenizer: transformers.PreTrainedTokenizerFast,
                 **overrides: Any) -> transformers.PretrainedConfig:
    return config_cls(**{**TINY_DIMS, **overrides}, vocab_size=len(tokenizer),
                      architectures=[architecture], bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory,
                   smollm2_tokenizer: transformers.PreTrainedTokenizerFast) -> pathlib.Path:
    """Tiny LlamaForCausalLM, tied embeddings (as SmolLM2), no biases."""
    config = _tiny_config(transformers.LlamaConfig, "LlamaForCausalLM", smollm2_tokenizer,
                          tie_word_embeddings=True)
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), config, smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_d64_dir(tmp_path_factory: pytest.TempPathFactory,
                       smollm2_tokenizer: transformers.PreTrainedTokenizerFast) -> pathlib.Path:
    """`tiny_llama_dir` with heads of 64 (the default model's), where the C kernels' prefill
    attention takes AMX tiles on a bf16 cache (they need a multiple of 32)."""
    config = _tiny_config(transformers.LlamaConfig, "LlamaForCausalLM", smollm2_tokenizer,
                          tie_word_embeddings=True, hidden_size=256, intermediate_size=512)
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama-d64"), config, smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_d64_long_dir(tmp_path_factory: pytest.TempPathFactory,
                            smollm2_tokenizer: transformers.PreTrainedTokenizerFast
                            ) -> pathlib.Path:
    """`tiny_llama_d64_dir` with positions up to 1,536: decodes past 1,024 keys, where the AMX
    decode attends in parts (attention.c)."""
    config = _tiny_config(transformers.LlamaConfig, "LlamaForCausalLM", smollm2_tokenizer,
                          tie_word_embeddings=True, hidden_size=256, intermediate_size=512,
                          max_position_embeddings=1536)
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama-d64-long"), config, smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory,
                   smollm2_tokenizer: transformers.PreTrainedTokenizerFast) -> pathlib.Path:
    """Tiny Qwen2ForCausalLM: q/k/v biases, untied lm_head, rope_theta 1e6, and (as real Qwen2
    instruct models) two eos ids in generation_config.json: (2, 0)."""
    config = _tiny_config(transformers.Qwen2Config, "Qwen2ForCausalLM", smollm2_tokenizer,
                          tie_word_embeddings=False,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    return _save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), config, smollm2_tokenizer,
                      generation_eos=[smollm2_tokenizer.eos_token_id, 0])


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory: pytest.TempPathFactory,
                     smollm2_tokenizer: transformers.PreTrainedTokenizerFast) -> pathlib.Path:
    """Tiny MistralForCausalLM, untied, no sliding window (the forward does not implement one)."""
    config = _tiny_config(transformers.MistralConfig, "MistralForCausalLM", smollm2_tokenizer,
                          tie_word_embeddings=False, sliding_window=None)
    return _save_tiny(tmp_path_factory.mktemp("tiny-mistral"), config, smollm2_tokenizer)


def permute_for_gguf(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py `permute`): within each head, the two
    RoPE halves are interleaved. transformers undoes this when it reads a llama GGUF."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_llama_gguf(out: pathlib.Path, hf_dir: pathlib.Path, tokenizer_gguf: pathlib.Path,
                     name: str = "tiny-llama",
                     quantize: gguf.GGMLQuantizationType | None = None) -> pathlib.Path:
    """Write the Llama checkpoint in `hf_dir` as a GGUF (tensors named and q/k permuted as
    llama.cpp does), with the tokenizer metadata of `tokenizer_gguf`: all f32, or with its
    matrices quantized to `quantize` (norms stay f32, as llama.cpp keeps them)."""
    config = transformers.AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    weights = safetensors.torch.load_file(hf_dir / "model.safetensors")
    writer = gguf.GGUFWriter(out, arch="llama")
    writer.add_name(name)  # no "mistral" in it: transformers would then read it as Mistral
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if quantize is None
                         else gguf.LlamaFileType.MOSTLY_Q4_1)
    for key, field in gguf.GGUFReader(tokenizer_gguf).fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in weights.items():
        array = tensor.float().numpy()
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, hf_name
        if gguf_name.endswith("attn_q.weight"):
            array = permute_for_gguf(array, config.num_attention_heads)
        elif gguf_name.endswith("attn_k.weight"):
            array = permute_for_gguf(array, config.num_key_value_heads)
        if quantize is not None and array.ndim == 2:
            blocks = gguf.quantize(np.ascontiguousarray(array), quantize)
            writer.add_tensor(gguf_name, blocks, raw_shape=blocks.shape, raw_dtype=quantize)
            continue
        writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="session")
def tiny_gguf_path(tmp_path_factory: pytest.TempPathFactory,
                   tiny_llama_dir: pathlib.Path) -> pathlib.Path:
    """`tiny_llama_dir` written as an f32 llama GGUF with the SmolLM2 tokenizer metadata."""
    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.gguf"
    return write_llama_gguf(out, tiny_llama_dir, preset_gguf_path(DEFAULT_MODEL))


@pytest.fixture(scope="session")
def tiny_q4_gguf_path(tmp_path_factory: pytest.TempPathFactory,
                      tiny_llama_dir: pathlib.Path) -> pathlib.Path:
    """`tiny_llama_dir` as a Q4_1 llama GGUF (as the default model ships): the fp32 model the
    engine loads from it is the blocks' dequantization."""
    out = tmp_path_factory.mktemp("tiny-q4") / "tiny-llama-q4_1.gguf"
    return write_llama_gguf(out, tiny_llama_dir, preset_gguf_path(DEFAULT_MODEL),
                            quantize=gguf.GGMLQuantizationType.Q4_1)


@pytest.fixture(scope="session")
def default_model_dir() -> pathlib.Path:
    """The default model as an HF directory in default_cache_dir(): the first run on a machine
    converts it (~15 s), later runs reuse it. Mark tests that use it `@pytest.mark.slow`."""
    return resolve_model_path(DEFAULT_MODEL)
