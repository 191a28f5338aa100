"""`xyserve bench`: a load generator for any OpenAI-compatible server (as `vllm bench serve`).

    xyserve bench --base-url http://127.0.0.1:8000 --model smollm2-135m-instruct \\
        --dataset random --random-input-len 150 --random-output-len 64 --num-prompts 64 \\
        --max-concurrency 16 --slo ttft=500,tpot=50 --result-file out.json

`args.py` declares the options (imported by the CLI without heavy dependencies), `datasets.py`
builds the workload, `client.py` sends it, `metrics.py` reduces the results, `run.py` ties them
together and prints the report.
"""
