"""P/D disaggregation: what moving a request's KV from a prefill replica to a decode replica costs,
and how a request's two halves make one request record.

The flow (cluster.cluster_driver): a prefill replica runs the prompt with max_tokens = 1 (the
first token comes out of the prefill); the request is then added to a decode replica with its
prompt + that token, the prompt's KV external (Request.num_external_tokens). The decode replica
admits it FCFS when its blocks can be allocated, and only then does the transfer start (the
blocks are where the KV lands, as vLLM's and Mooncake's connectors pull it); it lands
`KvTransferModel.seconds` later and the request decodes from there.

The client's first token arrives once the KV has landed on the decode replica (that side
streams the request from then on), so TTFT = prefill + waiting for decode blocks + the transfer.
A request of one output token ends on the prefill replica and moves nothing.

Not modelled: the prefill replica keeps no blocks for a request after its prefill (its KV is
taken to be copied out at once), and transfers do not contend for a link.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from cluster.recorder import RequestRecord
from engine.arch import ModelArch
from npu_sim.collectives import Link, p2p_seconds
from npu_sim.hardware import ChipSpec

KvLink = Literal["auto", "hccs", "roce"]
KV_DTYPE_BYTES = 2  # bf16 / fp16 KV cache


def kv_bytes_per_token(arch: ModelArch, kv_dtype_bytes: int = KV_DTYPE_BYTES) -> int:
    """Bytes of one token's KV over all layers, K and V, all KV heads (the whole TP group)."""
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * kv_dtype_bytes


def resolve_link(kv_link: KvLink, num_npus: int, chip: ChipSpec) -> Link:
    """auto: HCCS when every NPU of the cluster fits one node's mesh, RoCE otherwise."""
    if kv_link == "auto":
        return "hccs" if num_npus <= chip.hccs_ranks else "roce"
    if kv_link not in ("hccs", "roce"):
        raise ValueError(f"kv link must be auto, hccs or roce, got {kv_link!r}")
    return kv_link


@dataclass(frozen=True)
class KvTransferModel:
    """The time to move a prompt's KV from a prefill replica to a decode replica."""

    link: Link  # hccs (inside a node) or roce (between nodes)
    bytes_per_token: int  # the whole model's KV per token
    num_lanes: int  # links used at once: each card of the smaller TP group sends its heads'
    #   share over its own link (min of the two TP sizes)
    chip: ChipSpec  # the link parameters (npu_sim.hardware)

    def seconds(self, num_tokens: int) -> float:
        return p2p_seconds(num_tokens * self.bytes_per_token / self.num_lanes, self.link,
                           self.chip)


@dataclass
class TransferRecord:
    """One request's hand-off from a prefill replica to a decode replica (simulated seconds)."""

    index: int  # the request's position in the workload
    prefill_replica: int  # replica indices
    decode_replica: int
    num_tokens: int  # prompt tokens whose KV moves
    prefill_end_s: float  # the prefill (and first token) finished
    start_s: float = math.nan  # the decode replica allocated the blocks: the transfer starts
    transfer_s: float = math.nan  # its duration
    land_s: float = math.nan  # the KV is on the decode replica: the first token is out

    @property
    def wait_s(self) -> float:
        """Waiting for the decode replica's blocks."""
        return self.start_s - self.prefill_end_s


TRANSFER_COLUMNS = ("index", "prefill_replica", "decode_replica", "num_tokens", "prefill_end_s",
                    "start_s", "transfer_s", "land_s")


def compose(prefill: RequestRecord, decode: RequestRecord | None,
            transfer: TransferRecord | None) -> tuple[RequestRecord, float | None]:
    """The request as its client saw it, from its prefill half and decode half; plus the gap
    between its first token (landed) and its second (the decode replica's first), an
    inter-token latency neither half recorded (None without a decode half)."""
    if decode is None or transfer is None or not decode.finish_reason:
        return prefill, None
    second_token_s = decode.arrival_s + decode.ttft_s
    record = replace(prefill, output_len=prefill.output_len + decode.output_len,
                     ttft_s=transfer.land_s - prefill.arrival_s,
                     e2e_s=decode.arrival_s + decode.e2e_s - prefill.arrival_s,
                     num_output_tokens=1 + decode.num_output_tokens,
                     finish_reason=decode.finish_reason)
    return record, second_token_s - transfer.land_s
