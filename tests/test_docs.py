"""The README a newcomer reads: short, SPIN first, every relative link in it and in docs/ resolves, and its CPU
commands run as written (here on tiny models built by the first of them)."""

import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def markdown_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_short_and_describes_spin_before_any_error_table():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    first_error_table = min((i for i in (text.find("| case |"), text.find("error:")) if i >= 0), default=len(text))
    assert 0 <= text.find("train_spin_diffusion.py") < first_error_table


def heading_anchors(path):
    """The anchors GitHub gives a file's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_resolves():
    missing = []
    for path in markdown_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"https?://|mailto:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file) if file else path
            if not linked.exists() or (anchor and anchor not in heading_anchors(linked)):
                missing.append(f"{path.relative_to(ROOT)}: {target}")
    assert not missing, missing
    assert len(markdown_files()) >= 9  # the docs/ map's files


def test_readme_cpu_commands_run_as_written(tmp_path):
    """The quickstart's block of CPU commands, with its relative output folders moved under tmp_path: the tiny
    models are built, and a 2-iteration LoRA SPIN run writes both iterations and a grid of theta_0 + 2 columns."""
    text = (ROOT / "README.md").read_text().split("<!-- readme-cpu-commands -->")[1]
    block = text.split("```bash\n")[1].split("```")[0]
    commands = [shlex.split(c) for c in block.replace("\\\n", " ").strip().splitlines()]
    for argv in commands:
        argv = [str(tmp_path / a) if a.startswith(("tiny/", "tiny-spin")) or a == "tiny" else a for a in argv]
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "tiny-spin"
    assert (out / "iter_2" / "pytorch_lora_weights.safetensors").exists()
    from PIL import Image

    width = Image.open(out / "iter_2" / "validation_grid.png").size[0]
    assert width > 3 * 128  # theta_0, iteration 1, iteration 2 (and the prompt labels)
    assert "validation_grid.png" in (out / "iter_2" / "README.md").read_text()  # the card embeds it
