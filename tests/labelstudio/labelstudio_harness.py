"""What the Label Studio tests share: the policy and trainer servers, JSON over HTTP, and a real
Label Studio started headless.

Label Studio runs from its own venv (.cache/labelstudio-venv, made by scripts/labelstudio_venv.sh
when missing, reused after), on 127.0.0.1 with a temporary data folder and this environment: a
fixed admin user and legacy API token, local ML backends and webhooks allowed (SSRF protection
off), no analytics, no version check. Its database starts as a copy of one migrated once
(.cache/labelstudio-data-template, made when missing): applying Label Studio's migrations to a fresh
database is most of its start-up, minutes on a busy machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from threading import Thread

from common.process import ServerProcess, start_server

ROOT = Path(__file__).resolve().parents[2]
VENV_SCRIPT = ROOT / "scripts" / "labelstudio_venv.sh"
TEMPLATE = ROOT / ".cache" / "labelstudio-data-template"  # holds a migrated label_studio.sqlite3
DATABASE = "label_studio.sqlite3"  # Label Studio's SQLite file in its data folder


@dataclass
class Servers:
    policy: ServerProcess
    trainer: ServerProcess
    model: Path


def start_servers(model: Path, data: Path, *trainer_args: str) -> Servers:
    """Policy and trainer servers on `model`, as subprocesses on 127.0.0.1 (ports chosen freely)."""
    policy = start_server("policy_server", ["--model", str(model), "--port", "0", "--host", "127.0.0.1"],
                          name="policy", cwd=ROOT, timeout=300)
    try:
        trainer = start_server(
            "trainer_server",
            ["--model", str(model), "--data", str(data), "--port", "0", "--host", "127.0.0.1",
             "--policy", policy.address, *trainer_args],
            name="trainer", cwd=ROOT, timeout=300,
        )
    except Exception:
        policy.stop()
        raise
    return Servers(policy, trainer, model)


def http_json(method: str, url: str, body=None, *, token: str | None = None, timeout: float = 60.0):
    """(status, parsed JSON body or text, seconds) of one request; never raises on HTTP errors."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Token {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            status, raw = reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    elapsed = time.perf_counter() - started
    try:
        return status, json.loads(raw or b"null"), elapsed
    except json.JSONDecodeError:
        return status, raw.decode(errors="replace"), elapsed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_venv() -> Path:
    """The label-studio executable, installing it first when the venv is missing (a few minutes)."""
    done = subprocess.run(["bash", str(VENV_SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"{VENV_SCRIPT} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


@dataclass
class LabelStudio:
    """A running Label Studio; `api(method, path, body)` calls its REST API with the admin token."""

    proc: subprocess.Popen
    url: str
    token: str
    started_in: float  # seconds from launch to /health UP
    output: deque = field(default_factory=lambda: deque(maxlen=300))

    def api(self, method: str, path: str, body=None, *, expect: int | tuple[int, ...] = (200, 201), timeout=120.0):
        status, reply, _ = http_json(method, self.url + path, body, token=self.token, timeout=timeout)
        expected = (expect,) if isinstance(expect, int) else expect
        if status not in expected:
            raise AssertionError(f"{method} {path} -> {status}, expected {expected}: {str(reply)[:2000]}")
        return reply

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(list(self.output)[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to its process group (the dev server forks a reloader child), then SIGKILL."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


TOKEN = "tokenfeedback-test-token-0123456789abcdef"


def label_studio_env(data_dir: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": "annotator@example.com",
        "LABEL_STUDIO_PASSWORD": "tokenfeedback-test-password",
        "LABEL_STUDIO_USER_TOKEN": TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "COLLECT_ANALYTICS": "false",
        "LATEST_VERSION_CHECK": "false",
    }
    for name in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "PYTHONPATH"):  # ours must not leak into it
        env.pop(name, None)
    return env


def migrated_database(executable: Path) -> Path:
    """A Label Studio database with all its migrations applied (and nothing else), made once with
    Label Studio's own `migrate` into a temporary folder and moved into place when complete."""
    database = TEMPLATE / DATABASE
    if database.exists():
        return database
    building = TEMPLATE.with_name(TEMPLATE.name + ".tmp")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    env = {**label_studio_env(building), "DJANGO_SETTINGS_MODULE": "label_studio.core.settings.label_studio"}
    python = executable.parent / "python"
    code = ("import os, sys, label_studio; sys.path.insert(0, os.path.dirname(label_studio.__file__)); "  # as it starts
            "import django; django.setup(); from django.core.management import call_command; "
            "call_command('migrate', verbosity=0)")
    done = subprocess.run([str(python), "-c", code], env=env, cwd=building, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0 or not (building / DATABASE).exists():
        raise RuntimeError(f"label-studio migrate failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    shutil.rmtree(TEMPLATE, ignore_errors=True)
    building.rename(TEMPLATE)
    return database


def start_label_studio(executable: Path, data_dir: Path, *, timeout: float = 300.0) -> LabelStudio:
    port = free_port()
    token = TOKEN
    env = label_studio_env(data_dir)
    shutil.copyfile(migrated_database(executable), data_dir / DATABASE)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(executable), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=data_dir,
        start_new_session=True,
    )
    server = LabelStudio(proc, f"http://127.0.0.1:{port}", token, 0.0)

    def pump() -> None:
        for line in proc.stdout:
            server.output.append(line.rstrip("\n"))

    Thread(target=pump, daemon=True).start()
    deadline = started + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"label-studio exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            status, reply, _ = http_json("GET", server.url + "/health", timeout=2.0)
            if status == 200 and isinstance(reply, dict) and reply.get("status") == "UP":
                break
        except OSError:
            pass
        if time.perf_counter() > deadline:
            server.stop()
            raise TimeoutError(f"label-studio not UP after {timeout:.0f}s:\n{server.log_tail()}")
        time.sleep(0.25)
    server.started_in = time.perf_counter() - started
    return server
