"""One-time conversion of a GGUF file into a cached Hugging Face directory.

`transformers` reads a GGUF (config, tokenizer with chat template, weights dequantized to fp32)
in ~15 s for the default model; a safetensors directory loads in well under a second. So each
GGUF is converted once into `<cache_dir>/models/<key>` and read from there afterwards.

Cache invariants:
- a cache directory is complete iff it holds MARKER, written last; only complete ones are used;
- a directory appears under its final name only by one atomic `os.rename` of a finished temp
  directory (`.<key>.tmp-*`, a sibling, so the rename never crosses filesystems), so a crash
  mid-conversion leaves at most a temp directory, never a half-written cache;
- converting processes serialize on an flock (`.<key>.lock`): the second one waits and then
  finds the cache complete instead of converting again; the lock holder also sweeps temp
  directories left by killed processes.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import transformers
from tqdm import tqdm

from engine.arch import ModelLoadError, architecture_of

logger = logging.getLogger("xyserve")

_T = TypeVar("_T")

MARKER = "xyserve-source.json"  # written last into a finished conversion; records the source


def cache_key(gguf_path: pathlib.Path) -> str:
    """Cache directory name of a user's GGUF file: its stem plus a hash of name, size and mtime,
    so an edited or replaced file converts anew while an unchanged one hits the cache."""
    stat = gguf_path.stat()
    ident = f"{gguf_path.name}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return f"{gguf_path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def is_complete(target: pathlib.Path) -> bool:
    """Whether `target` is a finished conversion (see the module's invariants)."""
    return (target / MARKER).is_file()


def ensure_converted(gguf_path: pathlib.Path, target: pathlib.Path, label: str) -> pathlib.Path:
    """Return `target`, converting `gguf_path` into it first unless it is already complete.

    `label` names the model in logs and the progress bar. Raises ModelLoadError when the GGUF
    cannot be read or holds an unsupported architecture; nothing is left under `target` then.
    """
    if is_complete(target):
        logger.info("using cached %s at %s", label, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}.lock"):
        if is_complete(target):  # another process converted it while we waited for the lock
            logger.info("using cached %s at %s (converted by another process)", label, target)
            return target
        _sweep_leftovers(target)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        start = time.perf_counter()
        logger.info("converting %s (%s) to %s (one-time; ~15 s for the default model)",
                    label, gguf_path, target)
        try:
            _convert_into(gguf_path, tmp, label)
            stat = gguf_path.stat()
            record = {"source": str(gguf_path), "size": stat.st_size,
                      "mtime_ns": stat.st_mtime_ns, "transformers": transformers.__version__,
                      "seconds": round(time.perf_counter() - start, 1)}
            (tmp / MARKER).write_text(json.dumps(record, indent=1) + "\n")
            _make_readable(tmp)
            os.rename(tmp, target)  # atomic: `target` appears complete or not at all
        except BaseException:  # Ctrl-C included: never leave a temp directory behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("converted %s to %s in %.1f s", label, target, time.perf_counter() - start)
    return target


@contextlib.contextmanager
def _exclusive(lock_path: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path` (created if needed; the file stays, empty)."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sweep_leftovers(target: pathlib.Path) -> None:
    """Remove what a killed conversion left: its temp directories and an incomplete `target`.
    Safe only under the lock, which every live converter of `target` holds."""
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        logger.warning("removing %s left by an interrupted conversion", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    if target.exists():
        logger.warning("removing incomplete cache directory %s (no %s)", target, MARKER)
        shutil.rmtree(target)


def _make_readable(tree: pathlib.Path) -> None:
    """mkdtemp creates 0700 and some writers 0600; a cache built by one user (say, at image
    build time as root) must stay readable by the user who serves from it."""
    tree.chmod(0o755)
    for file in tree.iterdir():
        file.chmod(0o644)


def _convert_into(gguf_path: pathlib.Path, out: pathlib.Path, label: str) -> None:
    """Read `gguf_path` with transformers and write it to `out` as an HF directory
    (config.json, generation_config.json, model.safetensors, tokenizer with chat template)."""
    folder, name = gguf_path.parent, gguf_path.name
    stages = ("reading config", "reading tokenizer", "dequantizing weights", "writing safetensors")
    with tqdm(total=len(stages), desc=f"Converting {label}", unit="stage",
              file=sys.stderr) as bar:

        def stage(index: int) -> None:
            bar.n = index
            bar.set_postfix_str(stages[index])  # refreshes the bar

        stage(0)
        config = _read_gguf(gguf_path, transformers.AutoConfig.from_pretrained, folder,
                            gguf_file=name, local_files_only=True)
        try:
            architecture_of(config)  # before the expensive steps: GGUF holds e.g. gpt2 too
        except ModelLoadError as exc:
            raise ModelLoadError(f"{gguf_path}: {exc}") from None
        stage(1)
        tokenizer = _read_gguf(gguf_path, transformers.AutoTokenizer.from_pretrained, folder,
                               gguf_file=name, local_files_only=True)
        stage(2)
        # config= spares a second parse of the GGUF metadata: parsing (gguf.GGUFReader walks
        # ~100k tokenizer strings in Python) costs ~3.5 s a time, far more than dequantizing.
        model = _read_gguf(gguf_path, transformers.AutoModelForCausalLM.from_pretrained, folder,
                           gguf_file=name, config=config, local_files_only=True,
                           dtype=torch.float32)
        stage(3)
        _save(model, tokenizer, out)
        bar.n = len(stages)
        bar.set_postfix_str("done")


def _read_gguf(gguf_path: pathlib.Path, reader: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Call a transformers GGUF reader, turning any failure into ModelLoadError naming the file
    (truncated files, bad magic and unknown tensor layouts surface as assorted exceptions)."""
    try:
        return reader(*args, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot read GGUF file {gguf_path} (corrupt or truncated?): "
                             f"{type(exc).__name__}: {exc}") from exc


def _save(model: Any, tokenizer: Any, out: pathlib.Path) -> None:
    """save_pretrained a GGUF-loaded model: transformers refuses that on the model itself (its
    config carries the GGUF quantization_config), so rebuild a plain model of the same class
    around the same tensors, with the quantization_config dropped and `architectures` set."""
    model_cls = type(model)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [model_cls.__name__]
    with torch.device("meta"):  # no random init: every parameter is assigned just below
        fresh = model_cls(config)
    fresh.load_state_dict(model.state_dict(), assign=True, strict=True)
    fresh.tie_weights()  # re-share lm_head with embed_tokens (assign made two Parameters)
    fresh.generation_config = copy.deepcopy(model.generation_config)
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
