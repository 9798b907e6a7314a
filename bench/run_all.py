"""Run every benchmark in turn (``make bench``); each prints its own hardware line and ratios."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for script in ("dp.py", "search_overhead.py", "cost_memory.py", "stage_overhead.py",
               "dask_scaling.py"):
    print(f"\n=== bench/{script} ===", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=True)
