"""Run a training script under accelerate's FSDP on CPU processes (tests only).

accelerate applies an FSDP config only to GPU-like processes: with ACCELERATE_USE_CPU=1 it silently falls back to
plain CPU data parallelism (MULTI_CPU), so `accelerate launch --use_fsdp ...` on this machine would test DDP under
another name. PyTorch's FSDP2 itself runs on CPU (gloo). This shim makes accelerate take its FSDP branch there too,
exactly as it does on GPUs (the same plugin, read from the same launch flags or config file), then runs the script:

    ACCELERATE_USE_CPU=1 accelerate launch --config_file examples/accelerate/fsdp2.yaml --num_processes 2 \\
        tests/fsdp_on_cpu.py train_spin_diffusion.py ...

Everything after accelerate's choice of distributed type (fully_shard, sharded optimizer states, gradient
clipping, save_state/load_state, get_state_dict) is accelerate's and PyTorch's own code.
"""

import os
import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # what AcceleratorState.__init__ does for MULTI_GPU when an FSDP plugin is given
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type
        print(
            f"fsdp_on_cpu: process {self.process_index} runs FSDP{fsdp_plugin.fsdp_version}, "
            f"wrapping {fsdp_plugin.transformer_cls_names_to_wrap}",
            flush=True,
        )


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script.py` would
    runpy.run_path(script, run_name="__main__")
