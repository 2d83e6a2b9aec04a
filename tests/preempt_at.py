"""Run train_spin_diffusion.py's command line with a preemption rehearsed (tests only): with PREEMPT_AT_STEP=N > 0,
the process of rank 0 sends itself SIGTERM after its N-th optimizer step, as a cluster would during training.

    PREEMPT_AT_STEP=6 torchrun --nproc_per_node 2 tests/preempt_at.py ARGS...
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train_spin_diffusion  # noqa: E402

AT = int(os.environ.get("PREEMPT_AT_STEP", "0"))
_real, _calls = train_spin_diffusion.optimizer_step, []


def _step(*args, **kwargs):
    result = _real(*args, **kwargs)
    _calls.append(1)
    if AT and len(_calls) == AT and os.environ.get("RANK", "0") == "0":
        os.kill(os.getpid(), signal.SIGTERM)
    return result


train_spin_diffusion.optimizer_step = _step
train_spin_diffusion.cli(sys.argv[1:])
