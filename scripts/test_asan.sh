#!/usr/bin/env bash
# Runs the kernel tests against an AddressSanitizer build of the native library, in a
# throwaway clone and venv (the normal build in this checkout is left alone).
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$src" "$work/realm"
cd "$work/realm"
python3 -m venv .venv
. .venv/bin/activate
pip install -q 'setuptools>=77' wheel 'cffi>=2.0' 'ziglang>=0.13'
REALM_NATIVE_SANITIZE=address pip install -q --no-build-isolation -e '.[test]'
LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
    python -m pytest -q -p no:cacheprovider tests/kernels "$@"
