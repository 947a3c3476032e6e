#!/usr/bin/env bash
# The project's test command (README, .ci/run): build the workspace's plugins,
# including the deliberately broken ones the loader tests use, then run every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ ! -e .libtorch ]]; then
    echo "test: .libtorch is missing; run scripts/setup.sh first" >&2
    exit 1
fi
scripts/fixtures.sh
cargo build --workspace --lib --bins --examples
cargo test --workspace "$@"
