#!/usr/bin/env python
"""Is this Python environment able to run the project? The first step of bench/gpu_check.sh, so that a missing
or mismatched package shows in seconds, not after a benchmark case has built an SD-1.5 UNet.

    python3 bench/check_env.py --pins bench/gpu_wheels.txt

1. Every pinned (carried) distribution is installed at its pin, and each of its requirements holds against what
   is installed (they were installed with --no-deps).
2. Every project module imports: the scripts, utils/, scorers/, bench/ and examples/.
3. Every library import written anywhere in those files, including the ones inside functions, resolves:
   `import a.b` imports, and each name of `from a.b import c` exists.
4. With --device, a tensor can be made and used there.
Exit 1 listing every problem found; prints the versions that matter first.
"""

import argparse
import ast
import importlib
import importlib.metadata as md
import sys
import traceback
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ["", "utils", "scorers", "bench", "examples", "examples/toy"]  # the project's code, not its tests
OPTIONAL = {"wandb"}  # imported only with --report_to wandb, which needs it installed
SHOWN = [
    "torch",
    "diffusers",
    "transformers",
    "huggingface_hub",
    "accelerate",
    "peft",
    "bitsandbytes",
    "datasets",
    "safetensors",
    "tokenizers",
    "numpy",
    "pyarrow",
    "fsspec",
]


def project_files():
    return [p for d in SOURCE_DIRS for p in sorted((ROOT / d).glob("*.py")) if p.resolve() != Path(__file__).resolve()]


def pins(path):
    reqs = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            reqs.append(Requirement(line))
    return reqs


def check_pins(reqs):
    problems = []
    for req in reqs:
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            problems.append(f"{req}: not installed")
            continue
        if not req.specifier.contains(dist.version, prereleases=True):
            problems.append(f"{req}: {dist.version} installed")
        for need in map(Requirement, dist.requires or []):
            if need.marker is not None and not need.marker.evaluate({"extra": ""}):
                continue
            try:
                have = md.version(need.name)
            except md.PackageNotFoundError:
                problems.append(f"{req.name} {dist.version} needs {need}: not installed")
                continue
            if need.specifier and not need.specifier.contains(Version(have), prereleases=True):
                problems.append(f"{req.name} {dist.version} needs {need}: {have} installed")
    return problems


def library_imports(path, own):
    """(line, module, names) for each absolute import of a non-stdlib, non-project module in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [a.name for a in node.names if a.name != "*"]))

    def top(m):
        return m.split(".")[0]

    return [f for f in found if top(f[1]) not in sys.stdlib_module_names and top(f[1]) not in own]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pins", action="append", default=[], help="Requirements file of carried wheels (repeatable).")
    p.add_argument("--device", default=None, help="Also require this torch device to be usable (cuda: a GPU).")
    a = p.parse_args()

    print(f"python {sys.version.split()[0]} at {sys.executable}")
    for name in SHOWN:
        try:
            mod = importlib.import_module(name)
            extra = f" (CUDA {mod.version.cuda}, available: {mod.cuda.is_available()})" if name == "torch" else ""
            print(f"  {name} {getattr(mod, '__version__', '?')} from {Path(mod.__file__).parent}{extra}")
        except Exception as e:  # reported below, with the others
            print(f"  {name}: {type(e).__name__}: {e}")

    problems = [f"pin {m}" for path in a.pins for m in check_pins(pins(path))]
    if a.device:
        try:
            import torch

            torch.ones(1, device=a.device).add_(1).item()
        except Exception as e:
            problems.append(f"device {a.device}: {type(e).__name__}: {e}")

    for d in SOURCE_DIRS:
        sys.path.insert(0, str(ROOT / d))
    sys.path.insert(0, str(ROOT))
    files = project_files()
    own = {f.stem for f in files} | {d.split("/")[0] for d in SOURCE_DIRS if d}
    modules = [
        ".".join(f.relative_to(ROOT).with_suffix("").parts) if f.parent.name in ("utils", "scorers") else f.stem
        for f in files
    ]
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:
            problems.append(f"import {name}: {type(e).__name__}: {e}\n" + "".join(traceback.format_exc(limit=-3)))

    checked, seen = 0, set()
    for f in files:
        for line, module, names in library_imports(f, own):
            where = f"{f.relative_to(ROOT)}:{line}"
            if module.split(".")[0] in OPTIONAL:
                print(f"  optional, not checked: {module} ({where})")
                continue
            for name in names or [None]:
                if (module, name) in seen:
                    continue
                seen.add((module, name))
                checked += 1
                try:
                    mod = importlib.import_module(module)
                    if name is not None and not hasattr(mod, name):
                        importlib.import_module(f"{module}.{name}")  # a submodule, not an attribute
                except Exception as e:
                    what = f"from {module} import {name}" if name else f"import {module}"
                    problems.append(f"{what} ({where}): {type(e).__name__}: {e}")

    print(f"checked {len(a.pins)} pin file(s), {len(modules)} project modules, {checked} library imports")
    if problems:
        print(f"error: {len(problems)} problem(s) in this environment:", file=sys.stderr)
        for m in problems:
            print(f"  {m}", file=sys.stderr)
        sys.exit(1)
    print("environment OK")


if __name__ == "__main__":
    main()
