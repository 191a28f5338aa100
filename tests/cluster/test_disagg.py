"""P/D disaggregation: the KV transfer is in TTFT, a decode replica admits a request only when
its blocks free up, and the transfer's cost follows the link. Timing only, no torch."""

from __future__ import annotations

import pytest

from cluster.cluster_sim import ClusterConfig, ClusterSimulation
from cluster.disagg import kv_bytes_per_token, resolve_link
from cluster.workload import RequestSpec, Workload
from engine.arch_presets import resolve_arch
from npu_sim.collectives import p2p_seconds
from npu_sim.hardware import get_chip

MODEL = "llama-2-7b"
PD = ClusterConfig(num_prefill_replicas=1, num_decode_replicas=1)


def run(requests: list[RequestSpec], cluster: ClusterConfig = PD, **options: object):  # type: ignore[no-untyped-def]
    options = {"max_num_batched_tokens": 2048, **options}
    return ClusterSimulation(MODEL, cluster, **options).run(Workload(tuple(requests), "pd"))


def test_lone_request_ttft_is_prefill_plus_transfer() -> None:
    result = run([RequestSpec(1.0, 1000, 6)])
    prefill, decode = result.replicas
    (p_record,) = prefill.recorder.requests.values()
    (transfer,) = result.run.transfers.values()
    # the prompt's KV over one HCCS link: 1000 tokens x 512 KiB (32 layers, 32 KV heads)
    expected_s = p2p_seconds(1000 * 2 * 32 * 32 * 128 * 2, "hccs", get_chip("910b2"))
    assert transfer.transfer_s == pytest.approx(expected_s)
    assert transfer.start_s == transfer.prefill_end_s == pytest.approx(1.0 + p_record.ttft_s)
    (request,) = result.recorder.requests.values()
    assert request.ttft_s == pytest.approx(p_record.ttft_s + expected_s, rel=1e-12)
    # then five decodes on the decode replica, from the landing on
    decode_steps = [s[2] for s in decode.recorder.steps]
    assert len(decode_steps) == 5 and request.num_output_tokens == 6
    assert request.e2e_s == pytest.approx(request.ttft_s + sum(decode_steps), rel=1e-12)
    assert result.summary.itl_s["mean"] == pytest.approx(sum(decode_steps) / 5, rel=1e-9)
    assert result.summary.num_npus == 2


def test_decode_admission_waits_for_blocks() -> None:
    # 12 blocks of 128 per engine; each request needs 8 (900 + 60 tokens): the second one's KV
    # can only move once the first has finished decoding and freed its blocks
    requests = [RequestSpec(0.0, 900, 60), RequestSpec(0.01, 900, 60)]
    result = run(requests, num_kv_blocks=12)
    first, second = (result.run.transfers[i] for i in (0, 1))
    decode = result.replicas[1]
    first_done_s = first.land_s + decode.recorder.requests[0].e2e_s - (
        first.land_s - first.prefill_end_s)
    assert second.prefill_end_s < first_done_s  # it was ready long before
    assert second.start_s >= first_done_s - 1e-12 and second.wait_s > 0.5
    # its TTFT includes that wait and then the transfer
    record = result.recorder.requests[1]
    assert record.ttft_s == pytest.approx(second.start_s + second.transfer_s - 0.01)
    roomy = run(requests)
    assert roomy.run.transfers[1].wait_s < 0.1
    assert roomy.recorder.requests[1].ttft_s < record.ttft_s - 0.5


def test_one_token_requests_end_on_the_prefill_replica() -> None:
    result = run([RequestSpec(0.0, 400, 1), RequestSpec(0.1, 400, 3)])
    assert list(result.run.transfers) == [1]
    assert result.recorder.requests[0].num_output_tokens == 1
    assert result.recorder.requests[1].num_output_tokens == 3
    assert result.summary.num_requests == 2


def test_link_between_nodes_is_roce() -> None:
    chip = get_chip("910b2")
    assert resolve_link("auto", 8, chip) == "hccs" and resolve_link("auto", 16, chip) == "roce"
    assert resolve_link("hccs", 64, chip) == "hccs"
    # 5 + 5 engines of TP 2 fill more than a node: RoCE, two lanes (each card its heads' share)
    sim = ClusterSimulation(MODEL, ClusterConfig(num_prefill_replicas=5, num_decode_replicas=5),
                            tensor_parallel_size=2)
    assert sim.kv_transfer is not None and sim.kv_transfer.link == "roce"
    per_token = kv_bytes_per_token(resolve_arch(MODEL))
    assert sim.kv_transfer.seconds(1000) == pytest.approx(
        p2p_seconds(1000 * per_token / 2, "roce", chip))


def test_decode_replicas_verify_drafts() -> None:
    result = run([RequestSpec(0.0, 500, 40)], speculative="ngram")
    prefill, decode = result.replicas
    assert not prefill.core.config.speculative_config.enabled
    assert decode.core.config.speculative_config.enabled
    # accepted drafts: fewer decode steps than tokens
    assert len(decode.recorder.steps) < 39
    assert result.recorder.requests[0].num_output_tokens == 40
