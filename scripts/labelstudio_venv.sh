#!/usr/bin/env bash
# Installs Label Studio (pinned) into its own venv under .cache/, apart from the project's venv:
# it brings Django and many pins of its own. Reused when present: a stamp file records the
# installed version, so a second run is instant.
#   usage: scripts/labelstudio_venv.sh            (prints the venv's label-studio path)
#   env:   LABELSTUDIO_VERSION (default 1.23.2), LABELSTUDIO_VENV (default .cache/labelstudio-venv)
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${LABELSTUDIO_VERSION:-1.23.2}"
VENV="${LABELSTUDIO_VENV:-.cache/labelstudio-venv}"
[[ "$VENV" = /* ]] || VENV="$PWD/$VENV"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.stamp-label-studio-$VERSION"

if [[ -f "$STAMP" && -x "$VENV/bin/label-studio" ]]; then
    echo "$VENV/bin/label-studio"
    exit 0
fi

# Build in a temporary folder and move it into place only when complete, so an interrupted
# install never leaves a half-built venv that later runs would take for a good one.
mkdir -p "$(dirname "$VENV")"
rm -rf "$VENV.tmp"
"$PYTHON" -m venv "$VENV.tmp"
"$VENV.tmp/bin/pip" install -q --disable-pip-version-check --upgrade pip >&2
"$VENV.tmp/bin/pip" install -q --disable-pip-version-check "label-studio==$VERSION" >&2
touch "$VENV.tmp/.stamp-label-studio-$VERSION"
rm -rf "$VENV"
mv "$VENV.tmp" "$VENV"
# A venv records its own absolute path in its scripts; rewrite it after the move.
grep -rl --null "$VENV.tmp" "$VENV/bin" | xargs -0 -r sed -i "s#$VENV.tmp#$VENV#g"
"$VENV/bin/python" -c "import label_studio; print(\"label-studio\", label_studio.__version__)" >&2
echo "$VENV/bin/label-studio"
