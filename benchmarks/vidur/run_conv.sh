#!/usr/bin/env bash
# Vidur on the Azure 2023 conversation trace (all 19,366 requests): bash run_conv.sh vllm|sarathi TAG
# VIDUR_DIR: Vidur's source; VIDUR_PY: the python of its venv. Outputs in $VIDUR_DIR/runs/TAG,
# the trained predictors in $VIDUR_DIR/cache (the first run trains them: ~25 min on 2 cores).
set -euo pipefail
SCHED=${1:-vllm}
TAG=${2:-$SCHED}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "${VIDUR_DIR:?set VIDUR_DIR to Vidur's source}"
export WANDB_MODE=disabled PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 MKL_NUM_THREADS=2
COMMON=(
  --replica_config_model_name meta-llama/Llama-2-7b-hf
  --replica_config_device a100
  --replica_config_network_device a100_pairwise_nvlink
  --replica_config_tensor_parallel_size 1
  --replica_config_num_pipeline_stages 1
  --cluster_config_num_replicas 1
  --global_scheduler_config_type round_robin
  --request_generator_config_type trace_replay
  --trace_request_generator_config_trace_file data/processed_traces/splitwise_conv.csv
  --trace_request_generator_config_max_tokens 16384
  --execution_time_predictor_config_type random_forrest
  --random_forrest_execution_time_predictor_config_prediction_max_tokens_per_request 16384
  --random_forrest_execution_time_predictor_config_prediction_max_batch_size 256
  --random_forrest_execution_time_predictor_config_prediction_max_prefill_chunk_size 16384
  --random_forrest_execution_time_predictor_config_num_training_job_threads 2
  --metrics_config_output_dir "runs/$TAG"
  --metrics_config_cache_dir cache
  --no-metrics_config_enable_chrome_trace
  --no-metrics_config_store_plots
)
case "$SCHED" in
  vllm)    SCHED_ARGS=(--replica_scheduler_config_type vllm
                       --vllm_scheduler_config_batch_size_cap 256
                       --vllm_scheduler_config_max_tokens_in_batch 16384) ;;
  sarathi) SCHED_ARGS=(--replica_scheduler_config_type sarathi
                       --sarathi_scheduler_config_batch_size_cap 256
                       --sarathi_scheduler_config_chunk_size 2048) ;;
  *) echo "unknown scheduler $SCHED (vllm or sarathi)"; exit 2 ;;
esac
mkdir -p runs
exec /usr/bin/time -v "${VIDUR_PY:-python3}" "$HERE/timed_main.py" "${COMMON[@]}" "${SCHED_ARGS[@]}"
