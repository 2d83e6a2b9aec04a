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
