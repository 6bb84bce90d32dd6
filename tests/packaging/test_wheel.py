"""`pip install .` gives a working package: a wheel built from the tracked sources alone (no stubs
generated beforehand, as in a fresh clone) carries tokenfeedback.v1, and its console scripts run.

The wheel goes into a new venv that borrows the project venv's third-party packages through a
.pth file (reinstalling torch would take minutes), so the test checks what the wheel itself brings:
the code and stubs are imported from the new venv, not from this checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _tracked_tree(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    assert not (dest / "clients/python/tokenfeedback/v1").exists(), "generated stubs must not be tracked"
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv with the wheel installed; returns its bin/ folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _tracked_tree(tmp / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(src)],
                   check=True, timeout=600)
    (wheel,) = (tmp / "dist").glob("tokenfeedback-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = subprocess.run([str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # third-party packages from the project venv, after the new venv's own site-packages
    project_site = sysconfig.get_paths()["purelib"]
    Path(site, "zz-project-deps.pth").write_text(project_site + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install", "-q", "--no-deps",
                    str(wheel)], check=True, timeout=300)
    return venv / "bin"


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def test_package_and_stubs_come_from_the_wheel(installed):
    out = subprocess.run(
        [str(installed / "python"), "-c",
         "import tokenfeedback, tokenfeedback.v1.policy_pb2 as p, policy_server, trainer_server, kernels;"
         "print(tokenfeedback.__file__); print(p.__file__); print(policy_server.__file__); print(kernels.__file__)"],
        cwd="/", env=_clean_env(), check=True, capture_output=True, text=True).stdout.split()  # fmt: skip
    venv = str(installed.parent)
    assert all(path.startswith(venv) for path in out), f"imported from outside the venv: {out}"


@pytest.mark.parametrize("script", ["tokenfeedback", "tokenfeedback-policy", "tokenfeedback-trainer"])
def test_console_scripts_answer_help(installed, script):
    done = subprocess.run([str(installed / script), "--help"], cwd="/", env=_clean_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_installed_policy_server_serves(installed, tiny_model_dir):
    proc = subprocess.Popen([str(installed / "tokenfeedback-policy"), "--model", str(tiny_model_dir), "--port", "0",
                             "--host", "127.0.0.1"], cwd="/", env=_clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline, address, seen = time.monotonic() + 240, None, []
        while address is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            match = re.search(r"policy listening on (\S+:\d+)", line)
            address = match.group(1) if match else None
        assert address, "no listening line:\n" + "".join(seen[-40:])
        from tokenfeedback import PolicyClient

        with PolicyClient(address, timeout=60) as policy:
            policy.wait_ready(timeout=240)
            done = policy.complete("Paris is the capital of", max_new_tokens=3, temperature=0)
        assert len(done.tokens) >= 1
    finally:
        proc.terminate()
        proc.wait(30)
