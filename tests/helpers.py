"""Small helpers shared by the tests."""

from pathlib import Path

import torch
from safetensors.torch import load_file


def sft_args(assets, output_dir, *extra, dataset=None):
    """A fast train_sft.py command line on the tiny assets."""
    return [
        "--pretrained_model_name_or_path",
        str(assets["pipeline"]),
        "--dataset_name",
        str(dataset or assets["pickapic"]),
        "--output_dir",
        str(output_dir),
        "--resolution",
        "32",
        "--train_batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "1000",
        "--validation_num_inference_steps",
        "2",
        "--num_validation_images",
        "2",
        "--report_to",
        "none",
        *map(str, extra),
    ]


def reset_accelerate():
    """accelerate keeps process-wide singletons; each in-process run must start from a clean slate,
    as a fresh `accelerate launch` would."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_sft(*argv):
    import train_sft

    reset_accelerate()
    args = train_sft.parse_args(list(argv))
    train_sft.main(args)
    return args


def tensors(path):
    """All tensors of a safetensors file, or of every safetensors file under a folder (keys prefixed)."""
    path = Path(path)
    if path.is_file():
        return load_file(str(path))
    out = {}
    for f in sorted(path.rglob("*.safetensors")):
        out.update({f"{f.relative_to(path)}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def assert_same_tensors(a, b, atol=1e-6, rtol=1e-5):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=rtol)]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def max_abs_diff(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def mean_abs_diff(a, b):
    """Mean absolute difference over all elements of two state dicts with the same keys."""
    total = sum(float((a[k].float() - b[k].float()).abs().sum()) for k in a)
    return total / sum(a[k].numel() for k in a)


def spin_args(assets, output_dir, *extra):
    """A fast train_spin_diffusion.py command line on the tiny assets (20 prompts, 2 sampling steps, every prompt
    sampled in every iteration: --gen_prompts_per_iteration all; `consumed_only` drops that)."""
    return [
        "--pretrained_model_name_or_path",
        str(assets["pipeline"]),
        "--dataset_name",
        str(assets["pickapic"]),
        "--output_dir",
        str(output_dir),
        "--resolution",
        "32",
        "--train_batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        "--lr_warmup_steps",
        "0",
        "--max_train_steps",
        "3",
        "--checkpointing_steps",
        "1000",
        "--num_iterations",
        "2",
        "--gen_num_inference_steps",
        "2",
        "--gen_batch_size",
        "4",
        "--gen_shard_size",
        "8",
        "--report_to",
        "none",
        "--gen_prompts_per_iteration",
        "all",
        "--validation_num_inference_steps",  # each iteration's sample grid: small, as the rest of the run
        "2",
        "--num_validation_images",
        "2",
        *map(str, extra),
    ]


def consumed_only(argv):
    """`argv` without spin_args' --gen_prompts_per_iteration all: iterations sample only what they train on."""
    i = argv.index("--gen_prompts_per_iteration")
    return argv[:i] + argv[i + 2 :]


def run_spin(*argv):
    import train_spin_diffusion

    reset_accelerate()
    args = train_spin_diffusion.parse_args(list(argv))
    train_spin_diffusion.main(args)
    return args
