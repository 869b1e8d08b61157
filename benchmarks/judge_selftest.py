"""The shapes judge against its own renders and against deliberately wrong prompts.

    python benchmarks/judge_selftest.py [PER_SPLIT]   (default 3000 per split: ~70 s on 2 cores)

Prints JSON: renders judged fully correct, misses on renders by kind, and wrong pairs caught by kind."""

import json
import sys
import time

from ldmkit.evaluation.judge import self_test

per_split = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
t = time.perf_counter()
report = self_test(per_split)
report["seconds"] = round(time.perf_counter() - t, 1)
report["command"] = f"python benchmarks/judge_selftest.py {per_split}"
print(json.dumps(report, indent=2))
