"""The servers' side of the launch protocol, and the vLLM venv's interpreter.

Starting servers as subprocesses (`start_server`, `ServerProcess`, `start_servers` for a policy
server and a trainer together) lives in the client package, tokenfeedback/launch.py, where the CLI,
the labeling page, the demo, the benchmarks and the tests all import it; the names are re-exported
here for server-side code and tests that import them from common.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tokenfeedback.launch import LISTENING, LaunchError, ServerProcess, announce, start_server, wait_serving

__all__ = ["LISTENING", "LaunchError", "ServerProcess", "announce", "start_server", "vllm_python", "wait_serving"]


def vllm_python(root: str | Path) -> Path:
    """The python of the vLLM venv (`make vllm`: .cache/vllm-venv under the checkout `root`), for
    `start_server(..., python=...)` with `--engine vllm`; built first when missing (many minutes
    the first time, instant after: scripts/vllm_venv.sh keeps a stamp)."""
    script = Path(root) / "scripts" / "vllm_venv.sh"
    done = subprocess.run(["bash", str(script)], cwd=root, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])
