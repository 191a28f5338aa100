"""A stand-in for Vidur's A100 attention profile of Llama-2-7B (attention.csv), where the source
snapshot lacks the file: the grid Vidur's profiler measures (its
get_attention_input_combinations(4096, 1, 128), tensor parallel 1/2/4/8, block size 16), so its
predictors train on as many rows of the same shapes and its prediction tables are as large, with
times (ms) from an A100 roofline (decode bound by ~1.3 TB/s of KV reads, prefill by ~150 TFLOP/s)
and 2% noise. Not measured data: Vidur's speed on it is representative, its latencies are not.

    python standin_attention_csv.py OUT.csv
"""

from __future__ import annotations

import sys
from itertools import product

import numpy as np
import pandas as pd

MAX_SEQ_LEN = 4096
NUM_HEADS, HEAD_DIM, HIDDEN = 32, 128, 4096
STATS = ("attn_input_reshape", "attn_decode", "attn_output_reshape", "attn_prefill")


def grid() -> list[tuple[int, int, int, bool]]:
    """(prefill chunk, KV length, batch size, is prefill) rows, as Vidur's profiler lists them."""
    chunks = [*range(64, 129, 16), *range(128, 1025, 32), *range(1024, MAX_SEQ_LEN + 1, 64)]
    seq_lens = [*range(0, 1025, 32), *range(1024, MAX_SEQ_LEN, 64)]
    rows = []
    for c in chunks:
        rows += product([c], [i * c for i in range(MAX_SEQ_LEN // c)], [1], [True])
    rows += product(seq_lens, [0], [1], [True])
    rows += product([0], seq_lens, range(1, 129), [False])
    return [(c, kv, bs, prefill) for c, kv, bs, prefill in rows
            if (prefill and bs == 1 and c > 0 and c + kv <= MAX_SEQ_LEN)
            or (not prefill and c == 0 and 0 < kv <= MAX_SEQ_LEN)]


def row(c: int, kv: int, bs: int, prefill: bool, tp: int, rng: np.random.Generator) -> dict:
    heads = NUM_HEADS / tp
    if prefill:
        main_ms = 0.010 + 4.0 * c * (kv + c / 2.0) * HEAD_DIM * heads / 1.5e11
        num_tokens = c
    else:
        main_ms = 0.008 + 0.0012 * bs + bs * kv * 2 * heads * HEAD_DIM * 2 / 1.3e9
        num_tokens = bs
    times = {"attn_input_reshape": 0.0, "attn_output_reshape": 0.001 + 2e-6 * num_tokens,
             "attn_prefill": main_ms if prefill else None,
             "attn_decode": None if prefill else main_ms}
    out: dict = {}
    for stat in STATS:
        t = times[stat]
        if t is not None:
            t *= 1 + 0.02 * rng.standard_normal()
        for k in ("min", "max", "mean", "median", "std"):
            out[f"time_stats.{stat}.{k}"] = np.nan if t is None else (0.0 if k == "std" else t)
    out.update(n_embd=HIDDEN, n_q_head=NUM_HEADS, n_kv_head=NUM_HEADS, block_size=16,
               num_tensor_parallel_workers=tp, max_model_len=MAX_SEQ_LEN, batch_size=bs,
               prefill_chunk_size=c, kv_cache_size=kv, is_prefill=prefill,
               attention_backend="AttentionBackend.FLASH_ATTENTION")
    return out


def main() -> None:
    rng = np.random.default_rng(0)
    rows = grid()
    frame = pd.DataFrame([row(*r, tp, rng) for tp in (1, 2, 4, 8) for r in rows])
    frame.to_csv(sys.argv[1], index=False)
    print(sys.argv[1], frame.shape, "rows per TP degree:", len(rows))


if __name__ == "__main__":
    main()
