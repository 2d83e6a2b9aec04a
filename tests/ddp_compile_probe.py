"""A torchrun entry point for tests/test_gpu_faults.py: train_spin_diffusion.py's cli, with
- --torch_compile through a recording backend (dynamo traces the UNet as for real; the graphs run eagerly),
- DDP's gradient buckets made small (the first 64 KiB, the others PROBE_BUCKET_MB), so that even the tiny UNet
  spans several,
- a record of what dynamo's DDP optimizer did: for each graph it split, how many subgraphs it compiled.
Each process writes its record to PROBE_OUT/rank<N>.json when it ends."""

import atexit
import json
import os
import sys
from pathlib import Path

import torch
from torch._dynamo.backends.distributed import DDPOptimizer
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train_spin_diffusion  # noqa: E402

record = {"graphs": [], "ddp_splits": [], "bucket_bytes_cap": None}


def backend(gm, example_inputs):
    record["graphs"].append(torch.is_grad_enabled())
    return gm.forward


real_compile = torch.nn.Module.compile
torch.nn.Module.compile = lambda self, *a, **kw: real_compile(self, *a, **{**kw, "backend": backend})

real_split = DDPOptimizer.compile_fn


def split(self, gm, example_inputs):
    before = len(record["graphs"])
    compiled = real_split(self, gm, example_inputs)
    record["ddp_splits"].append(len(record["graphs"]) - before)
    return compiled


DDPOptimizer.compile_fn = split
torch.distributed._DEFAULT_FIRST_BUCKET_BYTES = 64 * 1024  # DDP and its dynamo optimizer read it when they start
real_ddp_init = DistributedDataParallel.__init__


def ddp_init(self, *args, **kwargs):
    real_ddp_init(self, *args, **{**kwargs, "bucket_cap_mb": float(os.environ["PROBE_BUCKET_MB"])})
    record["bucket_bytes_cap"] = self.bucket_bytes_cap


DistributedDataParallel.__init__ = ddp_init


@atexit.register
def write_record():
    out = Path(os.environ["PROBE_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    train_spin_diffusion.cli(sys.argv[1:])
