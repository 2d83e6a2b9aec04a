"""Run train_spin_diffusion.py's command line (train_sft.py's with PREEMPT_SCRIPT=sft) with a preemption rehearsed
(tests only): with PREEMPT_AT_STEP=N > 0, the process of rank 0 sends itself SIGTERM after its N-th optimizer step,
as a cluster would during training.

    PREEMPT_AT_STEP=6 torchrun --nproc_per_node 2 tests/preempt_at.py ARGS...
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train_sft  # noqa: E402
import train_spin_diffusion  # noqa: E402

script = train_sft if os.environ.get("PREEMPT_SCRIPT") == "sft" else train_spin_diffusion
AT = int(os.environ.get("PREEMPT_AT_STEP", "0"))
_real, _calls = script.optimizer_step, []


def _step(*args, **kwargs):
    result = _real(*args, **kwargs)
    _calls.append(1)
    if AT and len(_calls) == AT and os.environ.get("RANK", "0") == "0":
        os.kill(os.getpid(), signal.SIGTERM)
    return result


script.optimizer_step = _step
script.cli(sys.argv[1:])
