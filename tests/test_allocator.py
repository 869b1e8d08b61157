"""The malloc settings for CPU inference (ldmkit.pipelines.allocator): applied once per process by
Pipeline.load, turned off by LDMKIT_MALLOC=default, and with no effect on results. Process-wide, so
each case runs in its own interpreter."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, hashlib, sys
import numpy as np
from ldmkit.pipelines import allocator
from ldmkit.pipelines import Pipeline
before = allocator._applied
pipe = Pipeline.load("shapes")
image = pipe("a red circle", steps=3, seed=4).images[0]
print(json.dumps({"before": before, "applied": allocator._applied, "again": allocator.tune_allocator(),
                  "image": hashlib.sha256(np.asarray(image).tobytes()).hexdigest()}))
"""


def _run(env_value):
    env = {k: v for k, v in os.environ.items() if k != "LDMKIT_MALLOC"}
    if env_value is not None:
        env["LDMKIT_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_pipeline_load_tunes_malloc_once_and_results_stay_bit_identical():
    tuned, default = _run(None), _run("default")
    assert tuned["before"] is None and tuned["applied"] is True and tuned["again"] is True
    assert default["applied"] is False and default["again"] is False
    assert tuned["image"] == default["image"]


RELEASE = """
import json, torch
from ldmkit.pipelines import allocator
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))
allocator.tune_allocator()
start = rss()
blocks = [torch.ones(1 << 20) for _ in range(64)]  # 256 MB in 4 MB blocks: below the mmap threshold
full = rss()
del blocks
kept = rss()
released = allocator.release_freed()
print(json.dumps({"start": start, "full": full, "kept": kept, "released": released, "after": rss()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_memory_stays_until_released():
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True)
    mb = json.loads(out.stdout.strip().splitlines()[-1])
    assert mb["full"] - mb["start"] > 200, mb  # the blocks were resident
    assert mb["kept"] - mb["start"] > 200, mb  # freed, but kept by the settings (what they are for)
    assert mb["released"] and mb["after"] - mb["start"] < 50, mb  # given back
