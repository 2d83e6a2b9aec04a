#!/usr/bin/env bash
# Fetch the wheels bench/gpu_check.sh needs on an offline GPU machine (the pins in bench/gpu_wheels.txt) into
# gpu_wheels/ (git-ignored), for CPython 3.12 (the H200's python3) and 3.11 (the CPU rehearsal here), then trim
# bitsandbytes to the two native libraries used: CUDA 13.0 (torch cu130) and CPU. Needs a package registry.
#   bash bench/fetch_gpu_wheels.sh [DIR]        # `make gpu-wheels`
# Fails if DIR ends up over 64 MiB (what may travel to the device machine with the working tree).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-gpu_wheels}
PINS=bench/gpu_wheels.txt
PY=${PYTHON:-python3}
LIMIT_MIB=64
KEEP_BNB_LIBS="libbitsandbytes_cuda130.so libbitsandbytes_cpu.so"

pins=$(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$PINS" | grep -v '^$')
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for pyver in 3.12 3.11; do  # wheels already saved for the first are kept; per-Python ones (multiprocess) are added
  # shellcheck disable=SC2086
  $PY -m pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version "$pyver" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$tmp" $pins
done

# bitsandbytes ships ~15 native libraries (CUDA 11.8..13.2, ROCm, XPU): keep two, and drop the others' RECORD lines
# so the rewritten wheel stays consistent (every file listed, every listed file there, hashes unchanged).
$PY - "$tmp" $KEEP_BNB_LIBS <<'EOF'
import glob, os, sys, zipfile

folder, keep = sys.argv[1], set(sys.argv[2:])
for path in glob.glob(os.path.join(folder, "bitsandbytes-*.whl")):
    dropped = lambda name: os.path.basename(name).startswith("libbitsandbytes_") and os.path.basename(name) not in keep
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(path + ".new", "w", zipfile.ZIP_DEFLATED) as dst:
        names = src.namelist()
        missing = keep - {os.path.basename(n) for n in names}
        if missing:
            sys.exit(f"error: {os.path.basename(path)} has no {sorted(missing)}")
        for info in src.infolist():
            if dropped(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(l for l in lines if not dropped(l.split(",", 1)[0])).encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    os.replace(path + ".new", path)
    print(f"trimmed {os.path.basename(path)}: kept {sorted(keep)}, dropped {sum(map(dropped, names))} libraries")
EOF

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
mv "$tmp"/*.whl "$DIR"/
ls -l "$DIR"
bytes=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "gpu wheels: $(ls "$DIR"/*.whl | wc -l) files, $mib MiB in $DIR"
if [ "$bytes" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "error: $DIR is $mib MiB, over the $LIMIT_MIB MiB that may travel with the working tree" >&2
  exit 1
fi
