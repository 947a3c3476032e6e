#!/usr/bin/env bash
# Set up everything vlmhost needs to build, run and test, idempotently:
#   * .venv/      a project-local Python virtualenv with torch==2.11.0 (its wheel
#                 carries libtorch and its headers) and the pinned reference
#                 packages the parity tests run (scripts/requirements-ref.txt);
#   * .libtorch   a link to that torch package; .cargo/config.toml points
#                 LIBTORCH at it, so plain `cargo build` / `cargo test` work and
#                 built binaries find libtorch through their run path;
#   * target/fixtures/  the tiny reference models the parity tests read;
#   * target/release/   the vlmhost binary and every plugin (cargo build --release).
# Running it again does nothing unless something changed: it then ends with
# "setup: done, nothing changed".
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python="${PYTHON:-python3}"
venv="$root/.venv"
req="$root/scripts/requirements-ref.txt"
stamp="$venv/.vlmhost-requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"

changed=0
if [[ ! -x "$venv/bin/python" ]]; then
    changed=1
    echo "setup: creating the virtualenv in .venv"
    "$python" -m venv "$venv"
fi

if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "setup: installing scripts/requirements-ref.txt into .venv (torch is large: a few minutes the first time)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
    echo "$want" > "$stamp"
    changed=1
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
    changed=1
fi
echo "setup: libtorch $torch_version at .libtorch -> $torch_dir"
fixtures="$("$root/scripts/fixtures.sh" | tee /dev/stderr)"
[[ "$fixtures" == *"up to date"* ]] || changed=1

# The release build: cargo rebuilds only what changed since the last one.
if ! command -v cargo > /dev/null; then
    echo "setup: cargo is missing: install Rust (https://rustup.rs), then run scripts/setup.sh again" >&2
    exit 1
fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
echo "setup: building target/release (the first time takes 15-20 minutes on 2 cores)"
if ! cargo build --release --workspace 2>&1 | tee "$log" >&2; then
    echo "setup: the release build failed (above)" >&2
    exit 1
fi
if grep -q "Compiling" "$log"; then
    changed=1
else
    echo "setup: target/release is up to date"
fi
if [[ "$changed" == 0 ]]; then
    echo "setup: done, nothing changed"
else
    echo "setup: done; next: scripts/demo.sh (the main job) or scripts/test.sh (the tests)"
fi
