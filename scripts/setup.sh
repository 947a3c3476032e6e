#!/usr/bin/env bash
# Set up everything vlmhost needs to build, run and test, idempotently:
#   * .venv/      a project-local Python virtualenv with torch==2.11.0 (its wheel
#                 carries libtorch and its headers) and the pinned reference
#                 packages the parity tests run (scripts/requirements-ref.txt);
#   * .libtorch   a link to that torch package; .cargo/config.toml points
#                 LIBTORCH at it, so plain `cargo build` / `cargo test` work and
#                 built binaries find libtorch through their run path.
# Running it again does nothing unless the requirements changed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python="${PYTHON:-python3}"
venv="$root/.venv"
req="$root/scripts/requirements-ref.txt"
stamp="$venv/.vlmhost-requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "setup: creating the virtualenv in .venv"
    "$python" -m venv "$venv"
fi

if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "setup: installing scripts/requirements-ref.txt into .venv (torch is large: a few minutes the first time)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
    echo "$want" > "$stamp"
else
    echo "setup: .venv is up to date"
fi

torch_dir="$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
torch_version="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
case "$torch_version" in
    2.11.0|2.11.0+*) ;;
    *) echo "setup: .venv has torch $torch_version, but tch 0.24 needs 2.11.0" >&2; exit 1 ;;
esac
if [[ "$(readlink .libtorch 2>/dev/null || true)" != "$torch_dir" ]]; then
    ln -sfn "$torch_dir" .libtorch
fi
echo "setup: libtorch $torch_version at .libtorch -> $torch_dir"
"$root/scripts/fixtures.sh"
echo "setup: done; next: cargo build --release --workspace"
