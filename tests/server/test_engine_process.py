"""The engine loop in a process of its own (engine.core_process), what `xyserve serve` runs: the
same tokens as the loop on a thread, every error crossing the pipe as the thread engine raises
it, and the child's lifetime bound to the parent's commands (the CLI tests drive it over HTTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import pathlib
import pickle
import signal
from collections.abc import AsyncIterator

import httpx
import pytest

from engine.arch import ModelLoadError
from engine.async_engine import AsyncEngine, EngineDeadError
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.core_process import load_engine
from engine.request import RequestRejected, SamplingParams
from engine.structured.params import StructuredOutputs
from tests.server.harness import ServerProcess

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [100, 200, 300, 400]]


def _config(model_dir: pathlib.Path) -> EngineConfig:
    return EngineConfig.from_kwargs(model=str(model_dir), num_kv_blocks=64, block_size=16,
                                    max_model_len=256, pin_threads=False)


@contextlib.asynccontextmanager
async def _running(engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


async def _tokens(engine: AsyncEngine, params: SamplingParams) -> list[list[int]]:
    async def one(i: int, prompt: list[int]) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(f"r{i}", prompt, params):
            tokens += out.new_token_ids
        return tokens

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS))))


def test_the_process_engine_generates_the_thread_engines_tokens(
        tiny_llama_dir: pathlib.Path) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                            logit_bias={5: 3.0}, stop_token_ids=(9999,))

    async def run(engine: AsyncEngine) -> list[list[int]]:
        async with _running(engine):
            return await _tokens(engine, params)

    config = _config(tiny_llama_dir)
    in_thread = asyncio.run(run(AsyncEngine(EngineCore.load(config))))
    in_process = asyncio.run(run(AsyncEngine.in_subprocess(config)))
    assert in_process == in_thread
    assert all(len(t) == 12 for t in in_process)


def test_a_model_that_cannot_load_raises_in_the_parent(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelLoadError, match=str(tmp_path / "nothing")):
        AsyncEngine.in_subprocess(EngineConfig.from_kwargs(model=str(tmp_path / "nothing")))


def test_errors_cross_the_pipe_as_the_thread_engine_raises_them(
        tiny_llama_dir: pathlib.Path) -> None:
    async def run() -> None:
        async with _running(AsyncEngine.in_subprocess(_config(tiny_llama_dir))) as engine:
            too_long = list(range(1, 300))  # beyond max_model_len 256
            with pytest.raises(RequestRejected) as rejected:
                async for _ in engine.generate("long", too_long, SamplingParams(max_tokens=4)):
                    pass
            assert "256" in str(rejected.value)
            bad = StructuredOutputs("regex", "([a-z", param="structured_outputs.regex")
            with pytest.raises(RequestRejected) as grammar:
                await engine.compile_grammar(SamplingParams(structured_outputs=bad))
            assert grammar.value.param == "structured_outputs.regex"
            good = SamplingParams(max_tokens=4, temperature=0.0,
                                  structured_outputs=StructuredOutputs("regex", "[ab]{4}"))
            await engine.compile_grammar(good)
            text = ""
            async for out in engine.generate("regex", [1, 2, 3], good):
                text += out.new_text
            assert len(text) == 4 and set(text) <= {"a", "b"}
            assert engine.is_alive  # none of it harmed the loop

    asyncio.run(run())


def test_the_childs_death_fails_open_and_later_requests(tiny_llama_dir: pathlib.Path) -> None:
    async def run() -> None:
        async with _running(AsyncEngine.in_subprocess(_config(tiny_llama_dir))) as engine:
            stream = engine.add_request("long", [1, 2, 3],
                                        SamplingParams(max_tokens=200, ignore_eos=True))
            await stream.__anext__()  # generating
            assert engine.engine_pid is not None
            os.kill(engine.engine_pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError, match="exit code -9"):
                async for _ in stream:
                    pass
            assert not engine.is_alive
            with pytest.raises(EngineDeadError):
                engine.add_request("later", [1, 2], SamplingParams(max_tokens=2))

    asyncio.run(run())


def test_the_child_ignores_interrupts_and_stops_when_told(tiny_llama_dir: pathlib.Path) -> None:
    async def run() -> None:
        engine = AsyncEngine.in_subprocess(_config(tiny_llama_dir))
        process = engine._host._process  # type: ignore[attr-defined]  # (its exit code)
        async with _running(engine):
            os.kill(process.pid, signal.SIGINT)  # a Ctrl-C reaches the whole process group
            os.kill(process.pid, signal.SIGTERM)
            tokens = await _tokens(engine, SamplingParams(temperature=0.0, max_tokens=3))
            assert [len(t) for t in tokens] == [3, 3, 3]
        assert not process.is_alive() and process.exitcode == 0

    asyncio.run(run())


def test_sampling_params_pickle_with_their_logit_bias() -> None:
    params = SamplingParams(max_tokens=3, logit_bias={7: -2.5}, stop=["x"], seed=11,
                            structured_outputs=StructuredOutputs("choice", '["a", "b"]'))
    again = pickle.loads(pickle.dumps(params))
    assert again == params and dict(again.logit_bias) == {7: -2.5}
    with pytest.raises(TypeError):  # still read-only after the trip
        again.logit_bias[7] = 1.0  # type: ignore[index]


def test_metrics_export_the_engine_process(tiny_server: ServerProcess) -> None:
    """`xyserve serve` runs its engine in a process of its own: /metrics has that process's
    series beside the front end's (the weights and the KV cache are there)."""
    values = {}
    for line in httpx.get(tiny_server.url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    engine_rss = values["xyserve:engine_process_resident_memory_bytes"]
    assert engine_rss > 64 * 2**20  # torch and the model
    assert values["process_resident_memory_bytes"] > 0
    assert values["xyserve:engine_process_cpu_seconds_total"] > 0


@pytest.mark.parametrize("where", ["thread", "process"])
def test_a_failing_stat_logger_stops_no_tokens(tiny_llama_dir: pathlib.Path, where: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("metrics backend down")

    async def run() -> list[list[int]]:
        config = _config(tiny_llama_dir)
        engine = (AsyncEngine(EngineCore.load(config)) if where == "thread"
                  else AsyncEngine.in_subprocess(config))
        engine.stat_loggers.append(broken)
        engine.start()
        try:
            # (a bound: a dead event reader would leave the streams waiting forever)
            return await asyncio.wait_for(
                _tokens(engine, SamplingParams(temperature=0.0, max_tokens=4)), 60)
        finally:
            assert engine.is_alive
            await engine.shutdown()

    assert [len(t) for t in asyncio.run(run())] == [4, 4, 4]
    assert "metrics backend down" in caplog.text


def test_the_engine_process_freezes_its_model_out_of_the_cyclic_gc(
        tiny_llama_dir: pathlib.Path) -> None:
    """What the child loads lives as long as it does; a full GC pass over it would stall every
    stream (the server's front end freezes its own startup objects too: server.app)."""
    try:
        core = load_engine(_config(tiny_llama_dir))
        # frozen: in the permanent generation, which gc.get_objects() leaves out
        assert gc.is_tracked(core) and gc.is_tracked(core.scheduler)
        assert not any(o is core or o is core.scheduler for o in gc.get_objects())
    finally:
        gc.unfreeze()
