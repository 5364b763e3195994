#!/usr/bin/env bash
# Wheels for a GPU machine whose Python (3.12) has PyTorch but not every dependency: downloads
# pydantic and its needs into ./.whl (keep .whl out of git); scripts/gpu_check.sh installs them
# into /tmp/site there. Run here, where pip can reach a package index or cache.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing_extensions==4.16.0
ls .whl
