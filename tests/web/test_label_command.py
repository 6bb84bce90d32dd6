"""`python -m tokenfeedback.label` on its own: it starts a policy and a trainer server (the
`tokenfeedback label` / `make label` default), serves the page, and stops both when it stops.
In the page: submit, Train with the progress stream, and the stale-version marker."""

from __future__ import annotations

import re
import socket
from urllib.parse import urlsplit

import pytest

from common.process import start_server
from tests.web.conftest import ROOT
from tests.web.test_label_page import open_page, wait_done

pytestmark = pytest.mark.browser


def refused(url: str) -> bool:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=2).close()
    except OSError:
        return True
    return False


@pytest.fixture
def label(tiny_model_dir, tmp_path, web_dist):
    """The label process with the servers it started; at the end it must stop them too."""
    server = start_server("tokenfeedback.label", [
        "--port", "0", "--model", str(tiny_model_dir), "--data", str(tmp_path / "trainer"),
        "--web-dir", str(web_dist),
    ], name="label", cwd=ROOT, wait_healthy=False, timeout=240)
    said = next(line for line in server.output if "labeling page:" in line)
    upstreams = re.findall(r"(?:policy|trainer) (http://\S+?)[,;]", said)
    try:
        assert len(upstreams) == 2, said
        assert not any(refused(url) for url in upstreams)
        yield server
    finally:
        assert server.stop() == 0, server.log_tail()
    assert all(refused(url) for url in upstreams), "the servers it started are still running"


def test_label_starts_servers_trains_and_marks_stale(page, label):
    open_page(page, f"http://{label.address}/")
    page.click("#sampling summary")
    page.fill("#seed", "9")
    page.fill("#prompt", "Ottawa is the capital of")
    page.click("#generate")
    first = wait_done(page)
    assert first["modelVersion"] == 0
    page.click("#tok-0")
    page.click("#mark-bad")
    page.click("#submit")
    page.wait_for_selector("#results li[data-status=accepted]")
    assert page.is_hidden("#stale")

    page.fill("#train-steps", "2")
    page.click("#train")
    page.wait_for_selector("#train-log li.done")
    log = page.locator("#train-log li").all_inner_texts()
    assert [line.split(" · ")[0] for line in log[:2]] == ["step 1/2", "step 2/2"]
    assert "published v1" in log[-1]
    # The policy now serves v1: the completion on the page, made by v0, is marked stale.
    page.wait_for_selector("#stale:not([hidden])")
    assert "made by v0" in page.inner_text("#stale") and "now v1" in page.inner_text("#stale")
    page.wait_for_function("document.getElementById('status').textContent.includes('consumed1')")

    page.click("#generate")
    page.wait_for_function("(JSON.parse(localStorage.getItem('tokenfeedback.work')) || {}).annotationId"
                           f" !== '{first['annotationId']}'")
    assert wait_done(page)["modelVersion"] == 1
    assert page.is_hidden("#stale")
