"""Every example config parses with its script (a config whose flags conflict would fail a user at once)."""

from pathlib import Path

import pytest

import train_sft
import train_spin_diffusion

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("config", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_config_parses(config):
    script = train_sft if "sft" in config else train_spin_diffusion
    extra = ["--pretrained_model_name_or_path", "m", "--dataset_name", "d"] if config.startswith("demo") else []
    args = script.parse_args(["--config", str(EXAMPLES / config), *extra])
    assert args.pretrained_model_name_or_path and args.dataset_name


@pytest.mark.parametrize("script", [train_sft, train_spin_diffusion], ids=["sft", "spin"])
def test_help_lists_only_the_flags_the_script_takes(script, capsys):
    """--help names no flag its script refuses outright (they stay parseable so that the refusal can name the
    script that takes them), in the groups a reader looks for."""
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    text = capsys.readouterr().out
    for group in ("model:", "data:", "training:", "hub:", "checkpoints:", "logging and validation:"):
        assert f"\n{group}\n" in text, group
    if script is train_spin_diffusion:
        assert "\nSPIN:\n" in text and "\ngeneration (the opponent's samples):\n" in text
        refused = {"--streaming": [], "--cache_latents": [], "--validation_steps": ["10"]}
        refused["--proportion_empty_prompts"] = ["0.1"]
        for flag, value in refused.items():
            assert flag not in text
            with pytest.raises(SystemExit):  # still refused, saying why
                script.parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d", flag, *value])
            err = capsys.readouterr().err
            assert "train_sft.py" in err or "not supported by SPIN" in err, err
