"""`python -m vidur.main`, its phases timed: imports, set-up (config, cluster, predictors trained
or loaded, requests), the event loop, the output. Run with Vidur's source on the path."""

import atexit
import resource
import time

start = time.perf_counter()
from vidur.config import SimulationConfig  # noqa: E402
from vidur.simulator import Simulator  # noqa: E402
from vidur.utils.random import set_seeds  # noqa: E402

imported = time.perf_counter()
config = SimulationConfig.create_from_cli_args()
set_seeds(config.seed)
simulator = Simulator(config)
atexit.unregister(simulator._write_output)  # written below, timed
ready = time.perf_counter()
simulator.run()
ran = time.perf_counter()
simulator._write_output()
written = time.perf_counter()
max_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"[timed_main] imports {imported - start:.2f} s | set-up {ready - imported:.2f} s | "
      f"event loop {ran - ready:.2f} s | output {written - ran:.2f} s | "
      f"total {written - start:.2f} s | max RSS {max_rss_mib:.0f} MiB", flush=True)
