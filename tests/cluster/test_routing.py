"""Each router's choice on constructed replica states, and the prefix lookup on a real engine."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cluster.cluster_sim import ClusterConfig, ClusterSimulation
from cluster.replica import Replica
from cluster.routing import PromptKey, Router, RouterConfig
from cluster.workload import RequestSpec, Workload, synthetic_prompt
from engine.arch_presets import resolve_arch
from engine.config import EngineConfig
from engine.request import SamplingParams
from engine.timing_runner import build_timing_engine

PROMPT = PromptKey(num_tokens=1000, block_size=128, block_hashes=())


@dataclass
class Fake:
    """A replica as a router sees it: a load and a cached prefix."""

    load: int = 0
    cached: int = 0

    def outstanding_tokens(self) -> int:
        return self.load

    def cached_prefix_tokens(self, prompt: PromptKey) -> int:
        return self.cached


def test_round_robin_takes_turns_whatever_the_load() -> None:
    router = Router(RouterConfig("round-robin"))
    replicas = [Fake(load=10_000), Fake(), Fake()]
    assert [router.choose(replicas) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_least_loaded_picks_fewest_outstanding_tokens() -> None:
    router = Router(RouterConfig("least-loaded"))
    assert router.choose([Fake(load=900), Fake(load=300), Fake(load=500)]) == 1
    assert router.choose([Fake(load=300), Fake(load=300)]) == 0  # the first of equals
    # the cache does not matter to it
    assert router.choose([Fake(load=400, cached=1000), Fake(load=300)]) == 1


def test_prefix_aware_prefers_the_longest_cached_prefix_within_the_load_bound() -> None:
    router = Router(RouterConfig("prefix-aware", balance_rel=1.1, balance_abs_tokens=1000))
    # within the bound (least 2000 -> bound 3200): the longest prefix wins over a lighter load
    assert router.choose([Fake(2000, 0), Fake(3000, 768), Fake(2500, 512)], PROMPT) == 1
    # equal prefixes: the lighter one
    assert router.choose([Fake(3000, 768), Fake(2500, 768)], PROMPT) == 1
    # the cache holder is past the bound: the load decides
    assert router.choose([Fake(2000, 0), Fake(5000, 896)], PROMPT) == 0
    # a short hit (below half the prompt) is not worth it: least loaded
    assert router.choose([Fake(2000, 0), Fake(2100, 384)], PROMPT) == 0
    # nothing cached anywhere: least loaded
    assert router.choose([Fake(700), Fake(600), Fake(650)], PROMPT) == 1


@pytest.mark.parametrize("bad", [dict(policy="random"), dict(balance_rel=0.5),
                                 dict(cache_threshold=1.5), dict(balance_abs_tokens=-1)])
def test_router_config_is_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RouterConfig(**bad)  # type: ignore[arg-type]


def test_prompt_key_hashes_whole_blocks_as_the_kv_cache_does() -> None:
    key = PromptKey.of(list(range(300)), 128)
    assert key.num_tokens == 300 and len(key.block_hashes) == 2
    assert PromptKey.of(list(range(256)), 128).block_hashes == key.block_hashes
    assert PromptKey.of([7, *range(1, 300)], 128).block_hashes[1] != key.block_hashes[1]


def test_replica_answers_from_its_engine() -> None:
    config = EngineConfig.from_kwargs(model="llama-2-7b", block_size=16, num_kv_blocks=64,
                                      max_num_batched_tokens=512)
    core = build_timing_engine(config, resolve_arch("llama-2-7b"), "llama-2-7b")
    replica = Replica(0, "mixed", core, 1)
    shared = synthetic_prompt(1, 100)
    core.add_request("a", shared, SamplingParams(max_tokens=20, ignore_eos=True))
    assert replica.outstanding_tokens() == 120
    core.step()  # the prompt is computed (one step), its first token sampled
    assert replica.outstanding_tokens() == 20  # 19 to generate, the first one to run
    # 6 full blocks of 16 are cached; a prompt sharing 70 tokens finds 4 of them
    key = PromptKey.of([*shared[:70], *synthetic_prompt(2, 50)], 16)
    assert replica.cached_prefix_tokens(key) == 64
    assert replica.cached_prefix_tokens(PromptKey.of(shared, 32)) == 0  # other block size


def test_prefix_aware_cluster_sends_a_shared_prefix_where_it_is_cached() -> None:
    system = synthetic_prompt(99, 512)  # a system prompt (4 blocks) every request starts with
    workload = Workload(tuple(RequestSpec(0.5 * i, 576, 8, (*system, *synthetic_prompt(i, 64)))
                              for i in range(8)), "shared prefix")
    hits, served = {}, {}
    for policy in ("round-robin", "prefix-aware"):
        sim = ClusterSimulation("llama-2-7b", ClusterConfig(2, router=RouterConfig(policy)),
                                max_num_batched_tokens=1024)
        result = sim.run(workload)
        hits[policy] = sum(r.core.make_stats().prefix_cache_hits for r in result.replicas)
        served[policy] = [s.num_requests for s in result.replica_summaries]
    # round robin computes the prefix once on each replica; prefix-aware only once
    assert hits["round-robin"] == 6 * 512 and served["round-robin"] == [4, 4]
    assert hits["prefix-aware"] == 7 * 512 and sorted(served["prefix-aware"]) == [0, 8]
