"""GGUF sources: a tiny Llama GGUF converts to exactly the weights written, the cache is used
on the second load, conversion is atomic (an interrupted or concurrent one never leaves or uses
a half-written cache), and corrupt or unsupported GGUF files give a ModelLoadError."""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import socket
import threading
import time
from collections.abc import Callable

import gguf
import pytest
import torch
import transformers

from engine.models import gguf_convert
from engine.models.loader import LoadedModel, ModelLoadError, load_model

PROMPT_IDS = torch.tensor([[1, 30, 400, 5000, 20, 49151, 7]])  # any ids < 49152


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture(scope="module")
def loaded_gguf(tiny_gguf_path: pathlib.Path, gguf_cache: pathlib.Path) -> LoadedModel:
    """The tiny GGUF converted once for this module (~12 s, mostly GGUF metadata parsing),
    with the network unplugged."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", lambda *a: pytest.fail("network access"))
        return load_model(str(tiny_gguf_path), cache_dir=gguf_cache)


def test_gguf_yields_the_weights_written(loaded_gguf: LoadedModel,
                                         tiny_llama_dir: pathlib.Path,
                                         gguf_cache: pathlib.Path) -> None:
    original = load_model(str(tiny_llama_dir))
    assert loaded_gguf.path.parent == gguf_cache / "models"
    assert loaded_gguf.path.name.startswith("tiny-llama-")
    # The GGUF stores eps as float32; everything else comes through exactly.
    assert loaded_gguf.arch == dataclasses.replace(original.arch,
                                                   rms_norm_eps=loaded_gguf.arch.rms_norm_eps)
    assert loaded_gguf.arch.rms_norm_eps == pytest.approx(1e-6, rel=1e-6)
    # q/k were written in llama.cpp's permuted row order; transformers un-permutes them.
    assert set(loaded_gguf.weights) == set(original.weights)
    for name, tensor in original.weights.items():
        assert torch.equal(loaded_gguf.weights[name], tensor), name
    assert loaded_gguf.tokenizer.chat_template == original.tokenizer.chat_template
    # And transformers runs the converted directory as it runs the original one.
    with torch.no_grad():
        logits = [transformers.AutoModelForCausalLM.from_pretrained(path).eval()(PROMPT_IDS).logits
                  for path in (loaded_gguf.path, tiny_llama_dir)]
    torch.testing.assert_close(*logits)


def test_gguf_second_load_hits_the_cache(loaded_gguf: LoadedModel, tiny_gguf_path: pathlib.Path,
                                         gguf_cache: pathlib.Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    marker = loaded_gguf.path / gguf_convert.MARKER
    before = marker.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="xyserve"):
        again = load_model(str(tiny_gguf_path), cache_dir=gguf_cache)
    assert again.path == loaded_gguf.path
    assert marker.stat().st_mtime_ns == before
    assert f"using cached tiny-llama.gguf at {loaded_gguf.path}" in caplog.text
    assert "converted" not in caplog.text


def test_gguf_cache_key_follows_size_and_mtime(tmp_path: pathlib.Path) -> None:
    file = tmp_path / "m.gguf"
    file.write_bytes(b"x" * 10)
    key = gguf_convert.cache_key(file)
    assert key.startswith("m-") and gguf_convert.cache_key(file) == key
    stat = file.stat()
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert gguf_convert.cache_key(file) != key


def fake_converter(calls: list[pathlib.Path],
                   fail: bool = False) -> Callable[[pathlib.Path, pathlib.Path, str], None]:
    """Stands in for the 12 s conversion: writes a file into the temp dir, or fails halfway."""

    def convert(gguf_path: pathlib.Path, out: pathlib.Path, label: str) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        if fail:
            raise RuntimeError("disk full")

    return convert


def test_interrupted_conversion_leaves_no_cache(tmp_path: pathlib.Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[pathlib.Path] = []
    monkeypatch.setattr(gguf_convert, "_convert_into", fake_converter(calls, fail=True))
    source, target = tmp_path / "m.gguf", tmp_path / "models" / "m"
    source.write_bytes(b"GGUF")
    with pytest.raises(RuntimeError, match="disk full"):
        gguf_convert.ensure_converted(source, target, "m")
    assert calls and not calls[0].exists()  # the temp dir is gone
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == [".m.lock"]


def test_leftovers_of_a_killed_conversion_are_swept(tmp_path: pathlib.Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[pathlib.Path] = []
    monkeypatch.setattr(gguf_convert, "_convert_into", fake_converter(calls))
    source, target = tmp_path / "m.gguf", tmp_path / "models" / "m"
    source.write_bytes(b"GGUF")
    (target.parent / ".m.tmp-dead").mkdir(parents=True)
    target.mkdir()  # an incomplete cache (no marker) must never be used
    (target / "model.safetensors").write_bytes(b"half")
    assert gguf_convert.ensure_converted(source, target, "m") == target
    assert len(calls) == 1 and gguf_convert.is_complete(target)
    assert not (target / "model.safetensors").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == [".m.lock", "m"]


def test_concurrent_conversions_convert_once(tmp_path: pathlib.Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[pathlib.Path] = []
    convert = fake_converter(calls)

    def slow_convert(gguf_path: pathlib.Path, out: pathlib.Path, label: str) -> None:
        time.sleep(0.3)  # long enough for the second caller to reach the lock
        convert(gguf_path, out, label)

    monkeypatch.setattr(gguf_convert, "_convert_into", slow_convert)
    source, target = tmp_path / "m.gguf", tmp_path / "models" / "m"
    source.write_bytes(b"GGUF")
    results: list[pathlib.Path] = []
    threads = [threading.Thread(target=lambda: results.append(
        gguf_convert.ensure_converted(source, target, "m"))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [target, target]
    assert len(calls) == 1


# ------------------------------------------------------------------------ bad GGUF files


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_gguf(tiny_gguf_path: pathlib.Path, tmp_path: pathlib.Path, damage: str) -> None:
    bad = tmp_path / "bad.gguf"
    data = tiny_gguf_path.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 4096)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match=r"cannot read GGUF file .*bad\.gguf"):
        load_model(str(bad), cache_dir=cache)
    # Nothing but the lock file is left in the cache.
    assert [p.name for p in (cache / "models").iterdir()] == [
        f".{gguf_convert.cache_key(bad)}.lock"]


def test_unsupported_gguf_architecture(tmp_path: pathlib.Path) -> None:
    file = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(file, arch="gpt2")
    writer.add_context_length(64)
    writer.add_embedding_length(16)
    writer.add_block_count(1)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_layer_norm_eps(1e-5)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"tiny-gpt2\.gguf: unsupported architecture 'gpt2'"):
        load_model(str(file), cache_dir=tmp_path / "cache")
