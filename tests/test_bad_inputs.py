"""Bad input ends in seconds with one `error:` line that names the flag, file or repo, before any sample is
generated or any step trained, and without a traceback. Each row of docs/long-runs.md's "Bad input" table is a case
here; `test_readme_table_matches_the_cases` keeps the two in step."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import reset_accelerate, sft_args, spin_args
from hub_server import TEST_TOKEN, hub_online

ROOT = Path(__file__).resolve().parent.parent

# (case, script, flags added to a working command line ("drop:flag" removes one), message fragment).
# Paths are relative to the test's working folder, which `workdir` fills with the files named here.
CASES = [
    ("no model given", "sft", ["drop:--pretrained_model_name_or_path"], "--pretrained_model_name_or_path is required"),
    (
        "missing local model folder",
        "sft",
        ["--pretrained_model_name_or_path", "./no-such-model"],
        "--pretrained_model_name_or_path ./no-such-model: no such folder",
    ),
    (
        "folder that is not a pipeline",
        "spin",
        ["--pretrained_model_name_or_path", "empty-folder"],
        "--pretrained_model_name_or_path empty-folder: not a diffusers pipeline folder",
    ),
    (
        "model repo that does not exist",
        "spin",
        ["--pretrained_model_name_or_path", "nobody/no-such-model"],
        "--pretrained_model_name_or_path nobody/no-such-model: no such model repo on the Hub",
    ),
    (
        "model revision that does not exist",
        "sft",
        ["--pretrained_model_name_or_path", "test-user/tiny-sd", "--revision", "v9"],
        "the repo has no revision 'v9'",
    ),
    (
        "pipeline of a family the scripts do not train",
        "spin",
        ["--pretrained_model_name_or_path", "qwen-model"],
        "--pretrained_model_name_or_path qwen-model: a QwenImagePipeline, which these scripts do not train; "
        "supported: FluxPipeline (Flux.1",
    ),
    (
        "Hub model of a family the scripts do not train",
        "sft",
        ["--pretrained_model_name_or_path", "test-user/tiny-sana"],
        "--pretrained_model_name_or_path test-user/tiny-sana: a SanaPipeline, which these scripts do not train",
    ),
    (
        "trajectory objective on a flow model",
        "spin",
        ["--pretrained_model_name_or_path", "flux-model", "--spin_objective", "trajectory", "--gen_scheduler", "ddpm"],
        "cannot take --spin_objective trajectory: the trajectory objective needs a stochastic sampler; a flow "
        "model's is an ODE",
    ),
    (
        "flow-matching flag on a DDPM model",
        "sft",
        ["--weighting_scheme", "logit_normal"],
        "cannot take --weighting_scheme: a flow-matching (SD3, Flux) setting",
    ),
    (
        "fp8 base under gradient checkpointing on a UNet",
        "spin",
        ["--use_lora", "--layerwise_casting", "fp8_e4m3fn", "--gradient_checkpointing"],
        "cannot take --layerwise_casting with --gradient_checkpointing: the UNet's checkpointed blocks recompute",
    ),
    (
        "model_index.json that cannot be read",
        "sft",
        ["--pretrained_model_name_or_path", "broken-index"],
        "--pretrained_model_name_or_path broken-index: its model_index.json cannot be read",
    ),
    (
        "evaluate: a model of a family it cannot sample",
        "eval",
        ["--model", "x=qwen-model"],
        "--model x=qwen-model: a QwenImagePipeline, which these scripts do not train",
    ),
    ("no Hub token", "spin", ["--push_to_hub", "--hub_model_id", "test-user/x"], "--push_to_hub needs a Hub token"),
    (
        "bad Hub token",
        "sft",
        ["--push_to_hub", "--hub_model_id", "test-user/x", "--hub_token", "hf_wrong"],
        "the Hub refused the token (HTTP 401)",
    ),
    (
        "invalid --hub_model_id",
        "spin",
        ["--push_to_hub", "--hub_model_id", "bad id!", "--hub_token", TEST_TOKEN],
        "--hub_model_id 'bad id!' is not a valid Hub repo id",
    ),
    (
        "--hub_model_id too long for its -iterN repos",
        "spin",
        ["--push_to_hub", "--hub_model_id", "test-user/" + "a" * 92, "--hub_token", TEST_TOKEN],
        "-iter2' is not a valid Hub repo id",
    ),
    (
        "namespace the token cannot write to",
        "sft",
        ["--push_to_hub", "--hub_model_id", "someone-else/x", "--hub_token", TEST_TOKEN],
        "cannot create repos under 'someone-else'",
    ),
    ("corrupt run state", "spin", ["--output_dir", "broken"], "broken/spin_state.json is corrupt"),
    ("--output_dir is a file", "sft", ["--output_dir", "out.txt"], "--output_dir out.txt: exists and is not a folder"),
    (
        "LoRA targets that match nothing",
        "spin",
        ["--use_lora", "--lora_target_modules", "to_q,attn_q"],
        "--lora_target_modules: ['attn_q'] match no module of the UNet",
    ),
    (
        "corrupt checkpoint named to resume from",
        "sft",
        ["--output_dir", "run", "--resume_from_checkpoint", "checkpoint-2"],
        "--resume_from_checkpoint checkpoint-2: pytorch_lora_weights.safetensors is truncated or corrupt",
    ),
    (
        "checkpoint that does not exist",
        "sft",
        ["--resume_from_checkpoint", "checkpoint-99"],
        "--resume_from_checkpoint checkpoint-99: no such checkpoint folder",
    ),
    ("no dataset given", "spin", ["drop:--dataset_name"], "--dataset_name is required"),
    (
        "dataset file that does not exist",
        "sft",
        ["--dataset_name", "./missing.parquet"],
        "--dataset_name ./missing.parquet: no such file or folder",
    ),
    ("dataset file of an unknown type", "sft", ["--dataset_name", "data.xyz"], "unsupported file type '.xyz'"),
    ("column that is not in the dataset", "sft", ["--caption_column", "prompt"], "missing column(s) ['prompt']"),
    ("only ties in a Pick-a-Pic dataset", "spin", ["--dataset_name", "ties.parquet"], "no examples left"),
    (
        "DPO on an image-caption dataset",
        "spin",
        [
            "--dataset_name",
            "captions.parquet",
            "--image_column",
            "image",
            "--caption_column",
            "text",
            "--negative_source",
            "dataset",
        ],
        "--negative_source dataset needs a Pick-a-Pic-shaped dataset",
    ),
    (
        "a single-file checkpoint as the model",
        "spin",
        ["--pretrained_model_name_or_path", "model.safetensors"],
        "--pretrained_model_name_or_path model.safetensors: a single file; the scripts load a diffusers pipeline",
    ),
    ("a seed outside 0 .. 2**32 - 1", "sft", ["--seed", "-1"], "--seed must be between 0 and 2**32 - 1, got -1"),
    (
        "a size a Flux.1 model cannot tile",
        "spin",
        ["--pretrained_model_name_or_path", "flux-model", "--resolution", "40"],
        "cannot take --resolution 40: its images tile in 16 px steps; use e.g. 32",
    ),
    (
        "image paths that resolve nowhere",
        "sft",
        ["--dataset_name", "paths.csv", "--image_column", "image", "--caption_column", "text"],
        "paths.csv: none of the first 2 images decodes; the first, 'pics/0.png': FileNotFoundError",
    ),
    (
        "labels that are not numbers",
        "sft",
        ["--dataset_name", "yes-labels.parquet"],
        "column 'label_0' holds labels that are not numbers, e.g. 'yes'",
    ),
    (
        "the removed Pick-a-Pic repo",
        "spin",
        ["--dataset_name", "yuvalkirstain/pickapic_v2"],
        "was removed from the Hugging Face Hub in 2025: point --dataset_name at a copy",
    ),
    (
        "evaluate: --resolution not a multiple of 8",
        "eval",
        ["--resolution", "30"],
        "--resolution must be a multiple of 8, got 30",
    ),
    (
        "evaluate: prompts from the removed repo",
        "eval",
        ["--prompts", "pickapic_test_unique"],
        "was removed from the Hugging Face Hub in 2025",
    ),
    (
        "evaluate: unknown metric",
        "eval",
        ["--metrics", "pickscore", "fidelity"],
        "--metrics: unknown metric(s) ['fidelity']",
    ),
    (
        "--resolution not a multiple of 8",
        "sft",
        ["--resolution", "30"],
        "--resolution must be a multiple of 8, got 30",
    ),
    ("fp16 without a GPU", "sft", ["--mixed_precision", "fp16"], "--mixed_precision fp16 needs a GPU"),
    ("zero learning rate", "spin", ["--learning_rate", "0"], "--learning_rate must be > 0, got 0.0"),
    ("zero batch size", "sft", ["--train_batch_size", "0"], "--train_batch_size must be >= 1, got 0"),
    (
        "zero sampling steps",
        "spin",
        ["--gen_num_inference_steps", "0"],
        "--gen_num_inference_steps must be positive, got 0",
    ),
    ("non-positive --beta", "spin", ["--beta", "0"], "--beta must be positive, got 0.0"),
    ("negative --sft_weight", "spin", ["--sft_weight", "-0.5"], "--sft_weight must be >= 0, got -0.5"),
    (
        "channels-last with 8-bit Adam",
        "spin",
        ["--channels_last", "--use_8bit_adam"],
        "--channels_last and --use_8bit_adam conflict",
    ),
    ("EMA with LoRA", "sft", ["--use_ema", "--use_lora"], "--use_ema and --use_lora conflict"),
    ("SPIN with --streaming", "spin", ["--streaming"], "--streaming is not supported by SPIN"),
    ("config file that does not exist", "sft", ["--config", "missing.yaml"], "--config missing.yaml: file not found"),
    (
        "config key that is not a flag",
        "spin",
        ["--config", "typo.yaml"],
        "--config typo.yaml: unknown keys ['learnin_rate']",
    ),
    (
        "config value that is not one of the flag's choices",
        "spin",
        ["--config", "choice.yaml"],
        "--config choice.yaml: spin_objective: invalid choice 'trajectry' (choose from approximate, trajectory)",
    ),
    (
        "validation rendered in no steps",
        "sft",
        ["--validation_num_inference_steps", "0"],
        "--validation_num_inference_steps must be >= 1, got 0",
    ),
    (
        "Hub retry time the other processes cannot wait for",
        "spin",
        ["--push_to_hub", "--hub_retry_max_time", "5000"],
        "--hub_retry_max_time 5000 must stay well under --ddp_timeout 7200",
    ),
    ("negative Hub retry time", "sft", ["--hub_retry_max_time", "-1"], "--hub_retry_max_time must be > 0, got -1.0"),
]


@pytest.fixture
def workdir(assets, tmp_path, monkeypatch):
    """A working folder holding the files the cases name; the scripts must not reach training."""
    from safetensors.torch import save_file

    import evaluate
    import train_sft
    import train_spin_diffusion

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out.txt").write_text("a file, not a folder\n")
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "qwen-model").mkdir()  # an index is all the check reads: no weights are needed to refuse it
    (tmp_path / "qwen-model" / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    (tmp_path / "flux-model").mkdir()
    (tmp_path / "flux-model" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    (tmp_path / "broken-index").mkdir()
    (tmp_path / "broken-index" / "model_index.json").write_text('{"_class_name": ')
    (tmp_path / "data.xyz").write_text("?")
    (tmp_path / "model.safetensors").write_bytes(b"weights of one file")
    (tmp_path / "paths.csv").write_text("text,image\na fox,pics/0.png\na car,pics/1.png\n")
    (tmp_path / "typo.yaml").write_text("learnin_rate: 1e-4\n")
    (tmp_path / "choice.yaml").write_text("spin_objective: trajectry\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "spin_state.json").write_text('{"done": [1')
    table = pq.read_table(assets["pickapic"])
    pq.write_table(
        table.set_column(table.column_names.index("label_0"), "label_0", pa.array([0.5] * len(table), pa.float64())),
        tmp_path / "ties.parquet",
    )
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    labels = ["yes"] + [str(x) for x in table.column("label_0").to_pylist()[1:]]
    pq.write_table(
        table.set_column(table.column_names.index("label_0"), "label_0", pa.array(labels)),
        tmp_path / "yes-labels.parquet",
    )
    checkpoint = tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    save_file({"w": torch.zeros(64, 64)}, str(checkpoint / "pytorch_lora_weights.safetensors"))
    data = (checkpoint / "pytorch_lora_weights.safetensors").read_bytes()
    (checkpoint / "pytorch_lora_weights.safetensors").write_bytes(data[: len(data) // 2])

    def training_started(*a, **k):
        raise AssertionError("bad input must be reported before any sample is generated or step trained")

    monkeypatch.setattr(train_sft, "optimizer_step", training_started)
    monkeypatch.setattr(train_spin_diffusion, "optimizer_step", training_started)
    monkeypatch.setattr(train_spin_diffusion, "generate_opponent_samples", training_started)
    monkeypatch.setattr(evaluate, "load_pipeline", training_started)
    return tmp_path


def command_line(assets, script, flags):
    """A working command line of `script` on the tiny assets, with `flags` added ("drop:--name" removes --name)."""
    if script == "eval":
        argv = [
            "--model",
            f"base={assets['pipeline']}",
            "--prompts",
            "prompts.txt",
            "--resolution",
            "32",
            "--num_inference_steps",
            "2",
            "--metrics",
            "pickscore",
            "--output_dir",
            "eval",
        ]
    else:
        argv = (sft_args if script == "sft" else spin_args)(assets, "out")
    for flag in flags:
        if flag.startswith("drop:"):
            i = argv.index(flag.removeprefix("drop:"))
            del argv[i : i + 2]
    return argv + [f for f in flags if not f.startswith("drop:")]


def run_case(assets, script, flags, capsys):
    """(exit code, the error text the user sees, seconds) of the command line run in-process."""
    import evaluate
    import train_sft
    import train_spin_diffusion

    cli = {"sft": train_sft.cli, "spin": train_spin_diffusion.cli, "eval": evaluate.cli}[script]
    argv = [str(assets["captions"]) if a == "captions.parquet" else a for a in command_line(assets, script, flags)]
    start = time.monotonic()
    reset_accelerate()
    with hub_online(), pytest.raises(SystemExit) as exit_:
        cli(argv)
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    code = exit_.value.code
    return (code if isinstance(code, int) else 1), (err if isinstance(code, int) else f"{err}{code}\n"), seconds


@pytest.mark.parametrize("case,script,flags,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_error_line(
    assets, workdir, hub_server, monkeypatch, capsys, case, script, flags, fragment
):
    if case == "no Hub token":
        monkeypatch.delenv("HF_TOKEN", raising=False)
    if case == "model revision that does not exist" and not hub_server.repo_exists("test-user/tiny-sd"):
        from huggingface_hub import create_repo, upload_folder

        with hub_online():
            create_repo("test-user/tiny-sd", token=TEST_TOKEN)
            upload_folder(repo_id="test-user/tiny-sd", folder_path=str(assets["pipeline"]), token=TEST_TOKEN)
    if case == "Hub model of a family the scripts do not train" and not hub_server.repo_exists("test-user/tiny-sana"):
        from huggingface_hub import create_repo, upload_file

        with hub_online():
            create_repo("test-user/tiny-sana", token=TEST_TOKEN)
            index = b'{"_class_name": "SanaPipeline", "transformer": ["diffusers", "SanaTransformer2DModel"]}'
            upload_file(
                path_or_fileobj=index, path_in_repo="model_index.json", repo_id="test-user/tiny-sana", token=TEST_TOKEN
            )
    code, text, seconds = run_case(assets, script, flags, capsys)
    lines = [line for line in text.splitlines() if "error: " in line]
    assert code != 0 and lines, text
    assert fragment in lines[0], f"expected {fragment!r} in {lines[0]!r}"
    assert "Traceback" not in text and seconds < 60


def test_entry_points_print_error_lines_without_tracebacks(assets, tmp_path):
    """The real command lines: a parser error (exit 2) and an error found after parsing (exit 1)."""
    for script, flags, code, fragment in [
        ("train_spin_diffusion.py", ["--pretrained_model_name_or_path", "./no-such-model"], 2, "no such folder"),
        (
            "train_sft.py",
            ["--use_lora", "--lora_target_modules", "nothing_here"],
            1,
            "['nothing_here'] match no module",
        ),
    ]:
        argv = (sft_args if script == "train_sft.py" else spin_args)(assets, tmp_path / "o")
        proc = subprocess.run(
            [sys.executable, str(ROOT / script), *argv, *flags],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
        )
        assert proc.returncode == code, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and re.search(r"error: .*" + re.escape(fragment), proc.stderr)


def readme_rows():
    text = (ROOT / "docs" / "long-runs.md").read_text()
    table = text.split("<!-- bad-inputs -->")[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows]


def test_readme_table_matches_the_cases():
    """Every row of the docs table is a case tested above, with the same message, and every case has its row."""
    rows = {row[0]: row for row in readme_rows()}
    assert set(rows) == {c[0] for c in CASES}
    for case, _, _, fragment in CASES:
        assert rows[case][-1] == f"`{fragment}`"


def refused_rows():
    """docs/long-runs.md's "Refused flag combinations" table: (flags, scripts, message fragment) per row."""
    text = (ROOT / "docs" / "long-runs.md").read_text().split("<!-- refused -->")[1]
    rows = []
    for line in text.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        flags = cells[0].split("`")[1].split()
        scripts = (
            ["sft", "spin"]
            if cells[1] == "both"
            else [{"`train_sft.py`": "sft", "`train_spin_diffusion.py`": "spin"}[cells[1]]]
        )
        rows += [(" ".join(flags), script, cells[3].strip("`")) for script in scripts]
    return rows


@pytest.mark.parametrize("flags,script,fragment", refused_rows())
def test_refused_combinations_in_the_readme_are_refused(assets, tmp_path, capsys, flags, script, fragment):
    import train_sft
    import train_spin_diffusion

    if "fp16" in flags and torch.cuda.is_available():
        pytest.skip("fp16 is refused only where no GPU is visible")
    make = sft_args if script == "sft" else spin_args
    parse = train_sft.parse_args if script == "sft" else train_spin_diffusion.parse_args
    argv = make(assets, tmp_path / "out")
    i = argv.index("--max_train_steps")  # the rows give it where they need it
    argv = argv[:i] + argv[i + 2 :]
    parse(argv)  # without the row's flags the command line is fine: the refusal is theirs
    with pytest.raises(SystemExit) as exit_:
        parse(argv + flags.split())
    assert exit_.value.code == 2
    assert fragment in capsys.readouterr().err


def test_a_tracker_that_is_not_installed_is_named_at_the_start(assets, tmp_path, monkeypatch, capsys):
    """--report_to wandb without wandb: one error line at parse time (accelerate would only warn, and log nothing)."""
    import importlib.util

    import train_sft

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit):
        train_sft.parse_args(sft_args(assets, tmp_path / "out", "--report_to", "wandb"))
    assert "--report_to wandb: the wandb package is not installed (pip install wandb)" in capsys.readouterr().err


def test_config_values_read_as_the_command_line_reads_them(assets, tmp_path):
    """A scalar for a list flag is one item, YAML's bare `no` is the choice "no", null leaves a switch off, and a
    float-valued key of an int flag is refused like `--rank 4.5` would be."""
    import train_spin_diffusion

    config = tmp_path / "c.yaml"
    config.write_text("validation_prompts: a red fox\nmixed_precision: no\nuse_lora: null\nlearning_rate: 1e-4\n")
    args = train_spin_diffusion.parse_args(spin_args(assets, tmp_path / "out", "--config", str(config)))
    assert (args.validation_prompts, args.mixed_precision, args.use_lora) == (["a red fox"], "no", False)
    assert args.learning_rate == 1e-3  # the command line's value wins over the file's
    config.write_text("rank: 4.5\n")
    with pytest.raises(SystemExit):
        train_spin_diffusion.parse_args(spin_args(assets, tmp_path / "out", "--config", str(config)))
