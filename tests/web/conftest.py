"""Fixtures for the labeling page's browser tests.

Real processes on 127.0.0.1: a policy server and a trainer server on the tiny model, each with its
Connect port (--http-port), the page's own process (`python -m tokenfeedback.label`) forwarding to
them, and Debian's Chromium driven by Playwright (browser downloads are not reachable here, so it
is launched by path). Each test gets a fresh browser context (its own localStorage) and leaves a
screenshot in test-artifacts/web/<test>.png, also when it fails.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import grpc
import pytest

import tokenfeedback.v1.trainer_pb2_grpc as trainer_grpc
from common.connect import CONNECT_LINE
from common.process import ServerProcess, start_server

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "web"
ARTIFACTS = ROOT / "test-artifacts" / "web"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def connect_url(server: ServerProcess) -> str:
    """The http://HOST:PORT a server announced for its Connect endpoint (after its gRPC line)."""
    for line in list(server.output):
        if match := CONNECT_LINE.search(line):
            return match.group(2)
    raise AssertionError(f"{server.name} announced no Connect port:\n{server.log_tail()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def web_dist() -> Path:
    """The built page; built here when `make web` has not run since the sources changed."""
    dist = WEB / "dist"
    sources = [*WEB.joinpath("src").iterdir(), *ROOT.joinpath("proto").rglob("*.proto"), WEB / "package-lock.json"]
    built = dist / "app.js"
    if not built.exists() or built.stat().st_mtime < max(p.stat().st_mtime for p in sources):
        subprocess.run(["bash", str(ROOT / "scripts" / "build_web.sh")], check=True, cwd=ROOT)
    return dist


@pytest.fixture(scope="module")
def policy(tiny_model_dir, start_policy_server) -> ServerProcess:
    return start_policy_server(tiny_model_dir, "--http-port", "0")


def launch_trainer(model_dir: Path, policy: ServerProcess, data: Path, port: int = 0, http_port: int = 0):
    return start_server("trainer_server", [
        "--model", str(model_dir), "--data", str(data), "--host", "127.0.0.1", "--port", str(port),
        "--http-port", str(http_port), "--policy", policy.address, "--batch-size", "4",
    ], name="trainer", cwd=ROOT)


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, policy, tmp_path_factory) -> ServerProcess:
    """One trainer per test module, for the tests that do not stop it."""
    with launch_trainer(tiny_model_dir, policy, tmp_path_factory.mktemp("trainer")) as server:
        yield server


@pytest.fixture
def start_trainer(tiny_model_dir, policy, tmp_path):
    """Factory: start_trainer(port=0, http_port=0) -> ServerProcess on one data folder per test, so
    a restarted trainer finds the store it had. Stopped at the end of the test."""
    started: list[ServerProcess] = []

    def start(port: int = 0, http_port: int = 0) -> ServerProcess:
        started.append(launch_trainer(tiny_model_dir, policy, tmp_path / "trainer", port, http_port))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def start_label(web_dist, policy):
    """Factory: start_label(trainer_connect_url, *args) -> (process, page URL)."""
    started: list[ServerProcess] = []

    def start(trainer_url: str, *args: str) -> tuple[ServerProcess, str]:
        server = start_server("tokenfeedback.label", [
            "--port", "0", "--policy-http", connect_url(policy), "--trainer-http", trainer_url,
            "--web-dir", str(web_dist), *args,
        ], name="label", cwd=ROOT, wait_healthy=False, timeout=60)
        started.append(server)
        return server, f"http://{server.address}/"

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def trainer_stub():
    """trainer_stub(server) -> TrainerServiceStub over gRPC (how the tests read back the store)."""
    channels = []

    def stub(server: ServerProcess) -> trainer_grpc.TrainerServiceStub:
        channel = grpc.insecure_channel(server.address)
        channels.append(channel)
        return trainer_grpc.TrainerServiceStub(channel)

    yield stub
    for channel in channels:
        channel.close()


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make system-deps` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A page in a fresh context (empty localStorage); errors thrown in the page fail the test."""
    context = browser.new_context(viewport={"width": 1180, "height": 820})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(30_000)
    yield page
    context.close()
    assert not errors, f"errors in the page: {errors}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Right after a test body, passed or failed, and before any fixture stops a server: a
    screenshot of the page under test-artifacts/web/<test>.png."""
    yield
    page = item.funcargs.get("page")
    if page is not None and not page.is_closed():
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{item.name}.png"), full_page=True)
