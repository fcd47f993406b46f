#!/usr/bin/env bash
# Install transformers 4.57.1 into .venv/tf4, beside the venv's transformers 5, for the tests of the 4.5x layouts
# (per-expert ModuleLists, DeepSeek/GLM routers returning (indices, weights), flagless GPT-OSS, Granite
# ParallelExperts, DBRX's chunked loop): tests/models/test_transformers4.py puts this directory first on PYTHONPATH.
#
# Idempotent and quick: a no-op when the directory already holds 4.57.1; otherwise about 15 s. --no-deps because
# the venv's numpy, safetensors, regex, pyyaml, filelock, fsspec, tqdm and packaging serve both versions (a second
# numpy on the path would shadow the one torch was tested with); only what transformers 4.57 needs and the venv
# lacks is added: huggingface-hub < 1.0, a tokenizers it accepts (<= 0.23.0), and requests with its dependencies.
#
# Env: PYTHON (default .venv/bin/python), TF4_DIR (default .venv/tf4).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
TARGET="${TF4_DIR:-$ROOT/.venv/tf4}"
VERSION="4.57.1"

imports() {
    PYTHONPATH="$TARGET" "$PYTHON" -c "import transformers, huggingface_hub, tokenizers, requests, sys; \
sys.exit(transformers.__version__ != '$VERSION')"
}

# The staging directory is moved into place only after a complete install, so its metadata is enough to trust.
if [ -f "$TARGET/transformers-$VERSION.dist-info/METADATA" ]; then
    echo "transformers $VERSION already in $TARGET"
    exit 0
fi

STAGING="$TARGET.staging"
rm -rf "$STAGING"
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$STAGING" \
    "transformers==$VERSION" "huggingface-hub>=0.34,<1.0" "tokenizers>=0.22,<=0.23.0" \
    requests urllib3 idna certifi charset-normalizer
rm -rf "$TARGET"
mv "$STAGING" "$TARGET"  # appears whole or not at all: an interrupted run leaves no half-installed directory
imports || { echo "transformers $VERSION in $TARGET does not import" >&2; exit 1; }
echo "transformers $VERSION installed in $TARGET"
