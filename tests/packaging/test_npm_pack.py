"""The TypeScript client packs as an npm package with its types, and the packed tarball installs
and imports in a project of its own (what a Node user does with it)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TS = ROOT / "clients/typescript"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tarball(tmp_path_factory) -> Path:
    if shutil.which("npm") is None or not (TS / "dist/src/index.js").exists():
        pytest.fail("npm or the built TypeScript client is missing: run `make clients-ts` (make test does)")
    out = tmp_path_factory.mktemp("npm")
    done = subprocess.run(["npm", "pack", "--json", "--pack-destination", str(out)], cwd=TS, check=True,
                          capture_output=True, text=True, timeout=300)
    (packed,) = json.loads(done.stdout)
    files = {f["path"] for f in packed["files"]}
    assert "dist/src/index.d.ts" in files and "dist/src/index.js" in files, sorted(files)
    assert not any(f.startswith(("src/", "test/", "dist/test/")) for f in files), "sources or tests in the package"
    return out / packed["filename"]


def test_packed_client_installs_and_imports(tarball, tmp_path):
    project = tmp_path / "user-project"
    project.mkdir()
    (project / "package.json").write_text(json.dumps({"name": "user-project", "private": True, "type": "module"}))
    subprocess.run(["npm", "install", "--prefer-offline", "--no-audit", "--no-fund", str(tarball)], cwd=project,
                   check=True, capture_output=True, text=True, timeout=600)
    script = ("import { PolicyClient, TrainerClient } from '@tokenfeedback/client';"
              "console.log(typeof PolicyClient, typeof TrainerClient);")
    done = subprocess.run(["node", "--input-type=module", "-e", script], cwd=project, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["function", "function"]
