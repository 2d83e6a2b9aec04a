"""What the README promises a reader who copies the code: no function in the scripts or in utils/ takes more
than 8 positional parameters, every utils/ module imports its siblings at the top (never inside a function) and
its docstring names the siblings it needs, and the SPIN step's branches sit in train_spin_diffusion.py."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [
    ROOT / "train_sft.py",
    ROOT / "train_spin_diffusion.py",
    ROOT / "evaluate.py",
    *sorted((ROOT / "utils").glob("*.py")),
]


def functions(path):
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_takes_more_than_8_positional_parameters():
    wide = []
    for path in SHIPPED:
        for fn in functions(path):
            positional = [a.arg for a in fn.args.posonlyargs + fn.args.args if a.arg != "self"]
            if len(positional) > 8:
                wide.append(f"{path.name}:{fn.lineno} {fn.name} ({len(positional)})")
    assert not wide, wide


def test_utils_modules_import_their_siblings_at_the_top_and_name_them():
    problems = []
    for path in sorted((ROOT / "utils").glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        siblings = {
            n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module
        }
        for fn in functions(path):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.level >= 1:
                    problems.append(f"{path.name}:{node.lineno} imports .{node.module} inside {fn.name}")
        doc = ast.get_docstring(tree) or ""
        if siblings:
            problems += [f"{path.name}: docstring does not name {s}.py" for s in siblings if f"`{s}.py`" not in doc]
        elif "copied on its own" not in doc:
            problems.append(f"{path.name}: docstring does not say it needs no sibling")
    assert not problems, problems


def test_the_spin_step_branches_on_its_flags_in_the_script():
    tree = ast.parse((ROOT / "train_spin_diffusion.py").read_text())
    step = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "spin_forward")
    tests = [ast.unparse(n.test) for n in ast.walk(step) if isinstance(n, ast.If)]
    assert "step.objective == 'trajectory'" in tests and tests.count("step.precomputed") == 2, tests
    assert [a.arg for a in step.args.kwonlyargs] == ["frozen", "step", "autocast"]
