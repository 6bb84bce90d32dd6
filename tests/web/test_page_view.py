"""What the labeling page shows, in headless Chromium against real policy and trainer servers: the
probability bands and their legend, where the cursor starts, a bad token's replacement, the
end-of-sequence chip, the alternatives list, the note under Submit and the trainer panel's loss.
"""

from __future__ import annotations

import math
import re

import grpc
import pytest

import tokenfeedback.v1.policy_pb2 as policy_pb2
import tokenfeedback.v1.policy_pb2_grpc as policy_grpc
from tests.web.conftest import ARTIFACTS, connect_url, free_port
from tests.web.test_label_page import open_page, wait_done

pytestmark = pytest.mark.browser

BANDS = (0.5, 0.1, 0.01, 0.0)  # web/src/tokens.ts BANDS, the CLI's colour bands


def band(logprob: float) -> int:
    p = math.exp(logprob)
    return next(i for i, low in enumerate(BANDS) if p >= low)


def generate(page, prompt: str, seed: int, max_tokens: int = 40) -> dict:
    if not page.is_visible("#seed"):
        page.click("#sampling summary")
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#seed", str(seed))
    page.fill("#prompt", prompt)
    page.click("#generate")
    page.wait_for_function("p => (JSON.parse(localStorage.getItem('tokenfeedback.work')) || {}).promptText === p",
                           arg=prompt)
    return wait_done(page)


def style(page, selector: str, pseudo: str | None = None) -> dict:
    return page.evaluate(
        """([sel, pseudo]) => {
          const s = getComputedStyle(document.querySelector(sel), pseudo);
          return {fontSize: s.fontSize, verticalAlign: s.verticalAlign, content: s.content,
                  background: s.backgroundColor, listStyle: s.listStyleType, display: s.display};
        }""",
        [selector, pseudo],
    )


def status_row(page, name: str) -> str:
    return page.evaluate(
        """name => {
          const dt = [...document.querySelectorAll('#status dt')].find((d) => d.textContent === name);
          return dt ? dt.nextElementSibling.textContent : null;
        }""",
        name,
    )


def test_bands_legend_cursor_replacement_and_alternatives(page, trainer, start_label):
    _, url = start_label(connect_url(trainer))
    open_page(page, url)
    w = generate(page, "Ottawa is the capital of", seed=11)
    tokens = w["tokens"]

    # Every chip is shaded by its probability band; the legend shows the four bands in the same
    # colours, and the four colours differ.
    bands = page.eval_on_selector_all("#tokens .tok", "els => els.map((e) => Number(e.dataset.band))")
    assert bands == [band(t["logprob"]) for t in tokens]
    swatches = page.eval_on_selector_all("#legend .swatch", "els => els.map((e) => [e.textContent, "
                                         "getComputedStyle(e).backgroundColor])")
    assert [label for label, _ in swatches] == ["p ≥ 50%", "10–50%", "1–10%", "< 1%"]
    assert len({colour for _, colour in swatches}) == 4
    for t, b in zip(tokens, bands, strict=True):
        assert style(page, f"#tok-{t['position']}")["background"] == swatches[b][1]

    # The cursor starts on the least likely token that adds characters (the page's help says so).
    least = min((t for t in tokens if t["text"]), key=lambda t: (t["logprob"], t["position"]))
    assert page.get_attribute("#tokens .tok.cursor", "data-pos") == str(least["position"])
    assert "least likely token" in page.evaluate("document.getElementById('help').textContent")

    # The alternatives are numbered once, by the list itself (the number is the key that picks one).
    page.keyboard.press("b")
    items = page.eval_on_selector_all("#alts li", "els => els.map((e) => e.textContent)")
    assert items and not any(re.search(r"\(\d+\)", item) for item in items), items
    assert style(page, "#alts")["listStyle"] == "decimal"

    # A bad token's replacement is drawn full size on the line, after the token.
    page.keyboard.press("1")
    chip = f"#tok-{least['position']}"
    repl = page.get_attribute(chip, "data-repl")
    assert repl
    after, own = style(page, chip, "::after"), style(page, chip)
    assert repl in after["content"]
    assert after["fontSize"] == own["fontSize"] and after["verticalAlign"] == "baseline", after

    # The trainer's answer belongs to the submitted completion: a new one clears it.
    page.keyboard.press("s")
    page.wait_for_selector("#results li[data-status=accepted]")
    assert "Trainer answered: accepted" in page.inner_text("#submit-note")
    generate(page, "Paris is the capital of", seed=12)
    assert page.inner_text("#submit-note") == ""
    assert page.locator("#results li[data-status=accepted]").count() == 1  # the history stays


def test_end_of_sequence_chip_is_named_by_the_finish_reason(page, policy, trainer, start_label):
    """The tiny model's end-of-sequence id is also its bos and unk: the last chip of a completion
    that finished on it reads "eos"."""
    with grpc.insecure_channel(policy.address) as channel:
        info = policy_grpc.PolicyServiceStub(channel).GetModelInfo(policy_pb2.GetModelInfoRequest())
    roles = {t.role for t in info.special_tokens if t.role != "eos"
             and t.token_id == next(s.token_id for s in info.special_tokens if s.role == "eos")}
    assert roles, "the test needs an eos id that has other roles too"
    eos = next(t.token_id for t in info.special_tokens if t.role == "eos")
    _, url = start_label(connect_url(trainer))
    open_page(page, url)
    w = generate(page, "Berlin is the capital of", seed=4, max_tokens=6)
    end = w["tokens"][-1]["charEnd"]
    w["tokens"].append({**w["tokens"][-1], "position": len(w["tokens"]), "tokenId": eos, "text": "",
                        "charStart": end, "charEnd": end, "alternatives": []})
    w["finish"] = "eos"
    page.evaluate("w => localStorage.setItem('tokenfeedback.work', JSON.stringify(w))", w)
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    last = f"#tok-{len(w['tokens']) - 1}"
    page.wait_for_function(f"document.querySelector('{last}').dataset.special === 'eos'")
    assert "eos" in style(page, last, "::before")["content"]


def test_trainer_panel_shows_no_loss_until_one_is_measured(page, start_trainer, start_label):
    port, http_port = free_port(), free_port()
    trainer = start_trainer(port, http_port)
    _, url = start_label(f"http://127.0.0.1:{http_port}")
    open_page(page, url)
    page.wait_for_selector("#status[data-reachable=true]")
    assert [status_row(page, k) for k in ("last loss", "token loss", "KL")] == ["—", "—", "—"]

    # A wrong fact, judged: " Canada" after "Toronto is the capital of" should have been " Ontario".
    page.fill("#prompt", "Toronto is the capital of")
    page.click("#judge summary")
    page.fill("#given", " Canada. Berlin is the capital of Germany.")
    page.click("#score")
    w = wait_done(page)
    canada = next(t for t in w["tokens"] if t["text"] == " Canada")
    page.click(f"#tok-{canada['position']}")
    page.keyboard.press("r")
    page.keyboard.type(" Ontario")
    page.keyboard.press("Enter")
    page.keyboard.press("s")
    page.wait_for_selector("#results li[data-status=accepted]")
    page.fill("#train-steps", "1")
    page.click("#train")
    page.wait_for_selector("#train-log li.done")
    page.wait_for_function("() => [...document.querySelectorAll('#status dt')].some((d) => "
                           "d.textContent === 'last loss' && d.nextElementSibling.textContent !== '—')")
    loss = float(status_row(page, "last loss"))
    assert math.isfinite(loss) and loss != 0.0
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "labeling-page.png"))  # docs/labeling-page.png is a copy
    assert w["tokens"]

    # A restarted trainer has measured nothing yet: no "last loss 0.0000".
    trainer.stop()
    page.wait_for_selector("#status[data-reachable=false]")
    start_trainer(port, http_port)
    page.wait_for_selector("#status[data-reachable=true]")
    assert [status_row(page, k) for k in ("last loss", "token loss", "KL")] == ["—", "—", "—"]
