#!/usr/bin/env bash
# Regenerate the reference fixtures the parity tests read, when their script
# changed. Each scripts/fixtures/make_NAME_fixture.py (or, for a family that
# keeps its reference script in its own folder, plugins/FAMILY/fixtures/
# make_NAME_fixture.py, and the plugin template's in templates/plugin-template/
# fixtures/) writes target/fixtures/NAME/,
# computed by the pinned reference packages in .venv (transformers, peft, ...);
# a stamp holding the sha256 of the script, the requirements and the inputs
# it reads marks it fresh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=.venv/bin/python
[[ -x "$py" ]] || { echo "fixtures: .venv is missing; run scripts/setup.sh first" >&2; exit 1; }
mkdir -p target/fixtures
generated=0
shopt -s nullglob
for script in scripts/fixtures/make_*_fixture.py plugins/*/fixtures/make_*_fixture.py templates/*/fixtures/make_*_fixture.py; do
    name="$(basename "$script")"; name="${name#make_}"; name="${name%_fixture.py}"
    out="target/fixtures/$name"
    # The script, the pinned packages and the inputs it reads (real configs kept in plugins/*/tests/,
    # the plugin template's tokenizer and chat template in templates/*/assets/).
    # Every fixture script counts: some fixtures are built from others (llava_train reads llava).
    want="$(cat "$script" scripts/fixtures/*.py plugins/*/fixtures/*.py templates/*/fixtures/*.py scripts/requirements-ref.txt plugins/*/tests/*.json templates/*/assets/* 2>/dev/null | sha256sum | cut -d' ' -f1)"
    if [[ -f "$out/.stamp" && "$(cat "$out/.stamp")" == "$want" ]]; then
        continue
    fi
    echo "fixtures: generating $out with $script"
    rm -rf "$out.tmp"
    # The shared helpers (tolerance.py) import from scripts/fixtures wherever the script lives.
    PYTHONPATH="scripts/fixtures${PYTHONPATH:+:$PYTHONPATH}" "$py" "$script" --output "$out.tmp"
    echo "$want" > "$out.tmp/.stamp"
    rm -rf "$out"
    mv "$out.tmp" "$out"
    generated=$((generated + 1))
done
if [[ "$generated" == 0 ]]; then
    echo "fixtures: up to date"
fi
