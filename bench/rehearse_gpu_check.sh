#!/usr/bin/env bash
# CPU rehearsal of bench/gpu_check.sh (`make gpu-rehearsal`, run by CI): the same script, from the same carried
# wheels, in a venv that holds the offline H200's packages and nothing else, on the tiny preset on CPU.
#   bash bench/rehearse_gpu_check.sh [OUT_DIR]      # default output/gpu_rehearsal; env: PYTHON, TESTS
# 1. venv .venv-h200 from bench/gpu_rehearsal_requirements.txt (made again when that file changes); it must hold
#    no CUDA build, only distributions named in bench/gpu_machine_packages.txt, and none of the carried ones
# 2. bench/gpu_check.sh end to end with that venv's python3: PRESET=tiny DEVICE=cpu SMALL=1
# 3. the same check without one wheel, and without one dependency of a carried wheel: each must fail, naming it
# 4. project tests in that venv against the H200's transformers / huggingface_hub / accelerate versions
# Differences that remain: torch 2.13.0+cpu stands in for 2.11.0+cu130, Python 3.11 for 3.12, numpy 2.4 for 2.5.
set -euo pipefail
cd "$(dirname "$0")/.."
unset PYTHONPATH
OUT=${1:-output/gpu_rehearsal}
VENV=${VENV:-.venv-h200}
BASE_PY=${PYTHON:-python3}
REQS=bench/gpu_rehearsal_requirements.txt
PINS=bench/gpu_wheels.txt
WHEELS=${WHEELS:-gpu_wheels}
PY=$VENV/bin/python3
# short on purpose (CI runs this after the suite): a LoRA SPIN run through transformers, peft, accelerate and
# diffusers, and the real Hub client against the local server; TESTS="tests/..." runs others the same way
TESTS=${TESTS:-tests/test_train_spin.py::test_two_lora_iterations tests/test_hub_server.py}
START=$SECONDS
say() { printf '\n==== rehearsal (%d s): %s\n' $((SECONDS - START)) "$*"; }
fail() { echo "rehearsal FAILED: $*" >&2; exit 1; }
rm -rf "$OUT"
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
carried=$(sed -e 's/#.*//' -e 's/==.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$PINS")

say "1. the venv $VENV ($REQS)"
if [ ! -f "$VENV/.installed" ] || [ "$REQS" -nt "$VENV/.installed" ]; then
  rm -rf "$VENV"
  "$BASE_PY" -m venv "$VENV"
  # torch pinned exactly: never a CUDA build. --no-compile: only what is imported gets byte-compiled, on first use
  "$PY" -m pip install --quiet --disable-pip-version-check --no-compile -r "$REQS"
  touch "$VENV/.installed"
fi
if "$PY" -m pip list 2>/dev/null | grep -i nvidia; then fail "a CUDA build got into $VENV (the nvidia-* above)"; fi
"$PY" - bench/gpu_machine_packages.txt $carried <<'EOF'
import importlib.metadata as md, importlib.util, re, sys

norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
there = {norm(l.strip()) for l in open(sys.argv[1]) if l.strip() and not l.startswith("#")}
here = {norm(d.metadata["Name"]): d.version for d in md.distributions()}
print(f"python {sys.version.split()[0]}; {len(here)} distributions: " + ", ".join(f"{k} {v}" for k, v in sorted(here.items())))
if extra := sorted(set(here) - there):
    sys.exit(f"error: the venv holds what the H200 lacks: {extra}")
if present := [n for n in sys.argv[2:] if importlib.util.find_spec(n) is not None or norm(n) in here]:
    sys.exit(f"error: importable before the carried wheels go in, so a missing wheel would go unseen: {present}")
print(f"only H200 packages; not importable, as there: {', '.join(sys.argv[2:])}")
EOF
[ -d "$WHEELS" ] || bash bench/fetch_gpu_wheels.sh "$WHEELS"

say "2. bench/gpu_check.sh on the tiny preset, CPU, from $WHEELS/"
PYTHON=$PY WHEELS=$WHEELS PRESET=tiny DEVICE=cpu SMALL=1 bash bench/gpu_check.sh "$OUT/check" \
  || fail "bench/gpu_check.sh failed (its log: $OUT/check/gpu_check.log)"
"$PY" - "$OUT/check" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
files = sorted(p.name for p in out.rglob("*") if p.is_file())
assert len(files) <= 8, f"{len(files)} files in {out}, over the 8 that come back from a device run: {files}"
rows = {n: json.loads((out / n).read_text()) for n in ("gpu_spin_full.json", "gpu_rows.json")}
assert [len(v) for v in rows.values()] == [1, 5] and all(r["step_s"] > 0 for v in rows.values() for r in v), rows
gen = json.loads((out / "gpu_generate.json").read_text())
assert gen["generation_phase_img_s"] > 0 and gen["plain_pipeline_img_s"] > 0 and "errors" not in gen, gen
families = json.loads((out / "gpu_families.json").read_text())
assert [r["preset"] for r in families] == ["tiny-sdxl", "tiny-sdxl", "tiny-sd3", "tiny-flux"], families
assert all(r["step_s"] > 0 for r in families), families
assert sum(l.startswith("|---") for l in (out / "tables.md").read_text().splitlines()) == 6
print(f"gpu_check wrote {files}")
EOF

say "3. without a wheel, and without a carried wheel's dependency, the check fails and names it"
mkdir "$WORK/wheels"
cp "$WHEELS"/*.whl "$WORK/wheels/"
rm "$WORK/wheels"/datasets-*.whl
if PYTHON=$PY WHEELS=$WORK/wheels DEVICE=cpu ENV_ONLY=1 bash bench/gpu_check.sh "$WORK/out1" >"$WORK/log1" 2>&1 \
  || ! grep -q "lacks the wheel of: datasets==" "$WORK/log1"; then
  cat "$WORK/log1"; fail "gpu_check.sh did not fail, naming datasets, without the datasets wheel"
fi
echo "without the datasets wheel: failed as it should: $(grep -m1 'lacks the wheel' "$WORK/log1")"
cp "$WHEELS"/*.whl "$WORK/wheels/"
rm "$WORK/wheels"/dill-*.whl
grep -v '^dill==' "$PINS" >"$WORK/pins.txt"
if PYTHON=$PY WHEELS=$WORK/wheels PINS=$WORK/pins.txt DEVICE=cpu ENV_ONLY=1 bash bench/gpu_check.sh "$WORK/out2" \
    >"$WORK/log2" 2>&1 || ! grep -q "needs dill.*not installed" "$WORK/log2"; then
  cat "$WORK/log2"; fail "the import check did not fail, naming dill, with dill neither carried nor pinned"
fi
echo "without dill: the import check failed as it should: $(grep -m1 'needs dill' "$WORK/log2" | sed 's/^ *//')"

say "4. project tests against transformers 5.17, huggingface_hub 1.33, accelerate 1.15 (and the carried wheels)"
"$PY" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check --find-links "$WHEELS" \
  --target "$WORK/site" -r "$PINS"
# shellcheck disable=SC2086
if ! PYTHONPATH=$WORK/site "$PY" -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tee "$OUT/tests.txt"; then
  fail "project tests failed in $VENV (above; $OUT/tests.txt)"
fi

say "rehearsal OK in $((SECONDS - START)) s (results in $OUT)"
