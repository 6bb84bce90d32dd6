"""The labeling page in headless Chromium against real policy and trainer servers.

Each test does what an annotator does (mouse or keyboard only), then reads back over gRPC what the
trainer stored. Offsets the page sends are code points; the tiny tokenizer splits characters it
never saw (🎉, 東, 京) over several byte tokens, so those tests cover multi-token characters.
"""

from __future__ import annotations

import json
import math
import time

import grpc
import pytest

import tokenfeedback.v1.common_pb2 as common_pb2
import tokenfeedback.v1.policy_pb2 as policy_pb2
import tokenfeedback.v1.policy_pb2_grpc as policy_grpc
import tokenfeedback.v1.trainer_pb2 as trainer_pb2
from tests.web.conftest import ARTIFACTS, connect_url, free_port

pytestmark = pytest.mark.browser

VISIBLE = {" ": "·", "\n": "↵", "\t": "→", "\r": "␍"}


# ---- what a person does -----------------------------------------------------------------------


def open_page(page, url: str) -> float:
    """Load the page; returns seconds until it is ready to use."""
    start = time.monotonic()
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")
    return time.monotonic() - start


def work(page) -> dict:
    """The completion being labelled, as the page keeps it (localStorage)."""
    return page.evaluate("JSON.parse(localStorage.getItem('tokenfeedback.work'))")


def wait_done(page) -> dict:
    page.wait_for_function("() => (JSON.parse(localStorage.getItem('tokenfeedback.work')) || {}).done === true")
    return work(page)


def outbox(page) -> list[dict]:
    return page.evaluate("JSON.parse(localStorage.getItem('tokenfeedback.outbox') || '[]')")


def submitted_id(page, status: str = "accepted") -> str:
    return page.locator(f"#results li[data-status={status}]").first.get_attribute("data-annotation-id")


def chip_texts(page) -> list[str]:
    return page.eval_on_selector_all("#tokens .tok", "els => els.map(e => e.textContent)")


def shown(text: str) -> str:
    return "".join(VISIBLE.get(c, c) for c in text)


def drag_select(page, start: int, end: int) -> None:
    """Select the completion's code points [start, end) with the mouse: press at the left edge of
    the first character, release at the right edge of the last one."""
    rects = page.evaluate(
        """([start, end]) => {
          const w = JSON.parse(localStorage.getItem('tokenfeedback.work'));
          const rectOf = (cp) => {
            const t = w.tokens.find((t) => t.charStart <= cp && cp < t.charEnd);
            const chars = Array.from(t.text);
            const unit = chars.slice(0, cp - t.charStart).join('').length;
            const walker = document.createTreeWalker(document.getElementById('tok-' + t.position), NodeFilter.SHOW_TEXT);
            let seen = 0;
            for (let n = walker.nextNode(); n; n = walker.nextNode()) {
              if (unit < seen + n.length) {
                const r = document.createRange();
                r.setStart(n, unit - seen);
                r.setEnd(n, unit - seen + chars[cp - t.charStart].length);
                const b = r.getBoundingClientRect();
                return {left: b.left, right: b.right, y: b.top + b.height / 2};
              }
              seen += n.length;
            }
            throw new Error('no character ' + cp);
          };
          return [rectOf(start), rectOf(end - 1)];
        }""",
        [start, end],
    )
    first, last = rects
    page.mouse.move(first["left"] + 1, first["y"])
    page.mouse.down()
    page.mouse.move((first["left"] + last["right"]) / 2, last["y"], steps=4)
    page.mouse.move(last["right"] - 1, last["y"], steps=4)
    page.mouse.up()


def rows_of(stored) -> dict[tuple[int, int, bool], float]:
    return {(r.position, r.token_id, r.replacement): r.weight for r in stored.rows}


# ---- the tests -----------------------------------------------------------------------------------


def test_generate_mark_bad_choose_replacement_submit(page, trainer, start_label, trainer_stub):
    _, url = start_label(connect_url(trainer))
    load_s = open_page(page, url)
    page.click("#sampling summary")
    page.fill("#max-tokens", "120")
    page.fill("#seed", "11")
    page.fill("#alternatives", "5")
    # Record, at every change of the token strip, how many chips there are and whether the stream
    # is still open: chips must appear while it is.
    page.evaluate("""() => {
      window.seen = [];
      new MutationObserver(() => window.seen.push([document.querySelectorAll('#tokens .tok').length,
          document.getElementById('completion-meta').textContent.startsWith('generating')]))
        .observe(document.getElementById('tokens'), {childList: true});
    }""")
    page.fill("#prompt", "Ottawa is the capital of")
    started = time.monotonic()
    page.click("#generate")
    page.wait_for_selector("#tok-0")
    first_token_s = time.monotonic() - started
    w = wait_done(page)
    n = len(w["tokens"])
    assert n >= 3, w["finish"]
    assert any(0 < count < n and streaming for count, streaming in page.evaluate("window.seen")), \
        "the tokens were not drawn while the stream was open"

    # Every token is a chip with its whitespace visible; the tooltip has logprob, rank, version.
    assert chip_texts(page) == [shown(t["text"]) for t in w["tokens"]]
    title = page.get_attribute("#tok-1", "title")
    t1 = w["tokens"][1]
    assert f"logprob {t1['logprob']:.3f}" in title and f"rank {t1['rank']}" in title and "v0" in title

    # Mark one bad and take its first listed alternative as the replacement.
    p = next(t["position"] for t in w["tokens"][1:] if any(a["tokenId"] != t["tokenId"] for a in t["alternatives"]))
    page.click(f"#tok-{p}")
    page.click("#mark-bad")
    choice = page.locator("#alts li").first
    replacement = int(choice.get_attribute("data-token-id"))
    assert replacement != w["tokens"][p]["tokenId"]
    assert page.locator("#alts li").count() == len([a for a in w["tokens"][p]["alternatives"]
                                                    if a["tokenId"] != w["tokens"][p]["tokenId"]])
    choice.click()
    assert page.get_attribute(f"#tok-{p}", "class").split().count("bad") == 1
    assert page.get_attribute(f"#tok-{p}", "data-repl") is not None

    page.click("#submit")
    page.wait_for_selector("#results li[data-status=accepted]")
    annotation_id = submitted_id(page)
    assert annotation_id == w["annotationId"]
    assert outbox(page) == []
    total = trainer_stub(trainer).GetStatus(trainer_pb2.GetStatusRequest()).annotations_total
    page.wait_for_function(f"document.getElementById('status').dataset.total === '{total}'")

    stored = trainer_stub(trainer).GetAnnotation(trainer_pb2.GetAnnotationRequest(annotation_id=annotation_id))
    assert list(stored.prompt_token_ids) == w["promptTokenIds"]
    assert list(stored.completion_token_ids) == [t["tokenId"] for t in w["tokens"]]
    assert rows_of(stored) == {(p, w["tokens"][p]["tokenId"], False): -1.0, (p, replacement, True): 1.0}

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "timings.json").write_text(json.dumps(
        {"page_ready_s": load_s, "first_token_chip_s": first_token_s, "tokens": n}, indent=1))


def test_keyboard_only(page, trainer, start_label, trainer_stub, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Paris is the capital of\nBerlin is\n", encoding="utf-8")
    _, url = start_label(connect_url(trainer), "--prompts", str(prompts))
    open_page(page, url)

    page.keyboard.press("n")  # the next prompt from the list, generated at once
    w = wait_done(page)
    assert w["promptText"] == "Paris is the capital of"
    assert page.evaluate("document.activeElement.id") == "tokens"
    # The cursor starts on the least likely token that has text; it is one of the suggestions when
    # the policy gave it p < 0.5 and no textless chip (end of sequence) is less likely still
    # (tokens.ts, suggestions). The completion is sampled, so which case holds varies from run to run.
    least = min((t for t in w["tokens"] if t["text"]), key=lambda t: (t["logprob"], t["position"]))
    assert page.get_attribute("#tokens .tok.cursor", "data-pos") == str(least["position"])
    unlikely = least["logprob"] < math.log(0.5) and least == min(w["tokens"], key=lambda t: (t["logprob"], t["position"]))
    if unlikely:
        assert "suggested" in page.get_attribute("#tokens .tok.cursor", "class")

    # A second completion, typed: "/" focuses the prompt, Enter generates.
    page.keyboard.press("/")
    page.keyboard.press("Control+A")
    page.keyboard.type("Ottawa is the capital of")
    page.keyboard.press("Enter")
    page.wait_for_function("(JSON.parse(localStorage.getItem('tokenfeedback.work')) || {}).promptText"
                           " === 'Ottawa is the capital of'")
    w = wait_done(page)
    n = len(w["tokens"])
    p = min(2, n - 1)
    page.keyboard.press("Home")
    for _ in range(p):
        page.keyboard.press("ArrowRight")
    page.keyboard.press("b")
    page.keyboard.press("1")  # the first listed alternative becomes the replacement
    for _ in range(5):
        page.keyboard.press("-")  # weight 1.0 -> 0.5
    alternatives = [a for a in w["tokens"][p]["alternatives"] if a["tokenId"] != w["tokens"][p]["tokenId"]]
    expected = {(p, w["tokens"][p]["tokenId"], False): -0.5, (p, alternatives[0]["tokenId"], True): 0.5}
    if p + 1 < n:
        page.keyboard.press("ArrowRight")
        page.keyboard.press("g")
        expected[(p + 1, w["tokens"][p + 1]["tokenId"], False)] = 0.5
    page.keyboard.press("s")
    page.wait_for_selector("#results li[data-status=accepted]")

    stored = trainer_stub(trainer).GetAnnotation(trainer_pb2.GetAnnotationRequest(annotation_id=submitted_id(page)))
    assert list(stored.completion_token_ids) == [t["tokenId"] for t in w["tokens"]]
    assert rows_of(stored) == expected


def test_failed_submit_is_kept_and_stored_once(page, start_trainer, start_label, trainer_stub):
    port, http_port = free_port(), free_port()
    trainer = start_trainer(port, http_port)
    _, url = start_label(f"http://127.0.0.1:{http_port}")
    open_page(page, url)
    page.click("#sampling summary")
    page.fill("#seed", "5")
    page.fill("#prompt", "Berlin is the capital of")
    page.click("#generate")
    w = wait_done(page)
    page.click("#tok-0")
    page.click("#mark-bad")

    trainer.stop()
    page.click("#submit")
    page.wait_for_selector("#submit-note.error")
    assert "unavailable" in page.inner_text("#submit-note")
    assert [(e["id"], e["state"]) for e in outbox(page)] == [(w["annotationId"], "unsent")]

    # A reload keeps the completion, its labels and the unsent annotation.
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#outbox li[data-state=unsent]").count() == 1
    assert "bad" in page.get_attribute("#tok-0", "class").split()
    assert work(page)["annotationId"] == w["annotationId"]
    unsent = page.evaluate("localStorage.getItem('tokenfeedback.outbox')")

    trainer = start_trainer(port, http_port)  # same ports, same store
    page.click("#send-unsent")
    page.wait_for_selector("#results li[data-status=accepted]")
    assert outbox(page) == []

    # The same annotation sent again (as after a lost acknowledgement) is a duplicate, not a second row set.
    page.evaluate("saved => localStorage.setItem('tokenfeedback.outbox', saved)", unsent)
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.click("#send-unsent")
    page.wait_for_selector("#results li[data-status=duplicate]")
    stub = trainer_stub(trainer)
    assert stub.GetStatus(trainer_pb2.GetStatusRequest()).annotations_total == 1
    stored = stub.GetAnnotation(trainer_pb2.GetAnnotationRequest(annotation_id=w["annotationId"]))
    assert rows_of(stored) == {(0, w["tokens"][0]["tokenId"], False): -1.0}


def test_rejected_annotation_shows_reason_and_can_be_fixed(page, trainer, start_label, trainer_stub):
    _, url = start_label(connect_url(trainer))
    open_page(page, url)
    page.fill("#prompt", "Paris is the capital of")
    page.click("#generate")
    w = wait_done(page)
    # A span past the end of the text (as a stale page or a hand-edited store could hold): the
    # trainer rejects it, with a reason naming the field.
    w["spans"] = [{"start": 0, "end": 10_000, "weight": -1, "text": ""}]
    page.evaluate("w => localStorage.setItem('tokenfeedback.work', JSON.stringify(w))", w)
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.click("#submit")
    page.wait_for_selector("#results li[data-status=rejected]")
    reason = page.inner_text("#results li[data-status=rejected]")
    assert "span_labels[0]" in reason, reason
    assert [(e["id"], e["state"]) for e in outbox(page)] == [(w["annotationId"], "rejected")]
    assert work(page).get("submitted") is None

    # Fix it with the keyboard (clear the span, mark the first token bad) and submit again.
    page.focus("#tokens")
    page.keyboard.press("Home")
    page.keyboard.press("x")
    page.keyboard.press("b")
    page.keyboard.press("s")
    page.wait_for_selector("#results li[data-status=accepted]")
    assert outbox(page) == []
    stored = trainer_stub(trainer).GetAnnotation(trainer_pb2.GetAnnotationRequest(annotation_id=w["annotationId"]))
    assert rows_of(stored) == {(0, w["tokens"][0]["tokenId"], False): -1.0}


def test_spans_over_emoji_and_cjk_and_a_typed_replacement(page, policy, trainer, start_label, trainer_stub):
    """A given completion is scored, then judged: a typed replacement for one token (tokenized in
    context by the trainer), a bad span over an emoji and a good span over CJK characters, both
    split over several byte tokens."""
    completion = " France 🎉 and 東京 is in Japan."
    _, url = start_label(connect_url(trainer))
    open_page(page, url)
    page.fill("#prompt", "Ottawa is the capital of")
    page.click("#judge summary")
    page.fill("#given", completion)
    page.click("#score")
    w = wait_done(page)
    tokens = w["tokens"]
    assert "".join(t["text"] for t in tokens) == completion
    assert any(t["text"] == "" for t in tokens), "the test needs characters split over several tokens"
    # Drawn from the character spans: whole characters, nothing garbled, placeholders for the parts.
    assert chip_texts(page) == [shown(t["text"]) for t in tokens]
    assert "".join(chip_texts(page)) == shown(completion)

    # " France" is wrong: type what should have come instead.
    france = next(t for t in tokens if t["text"] == " France")
    page.click(f"#tok-{france['position']}")
    page.keyboard.press("r")
    page.keyboard.type(" Canada")
    page.keyboard.press("Enter")
    assert page.get_attribute(f"#tok-{france['position']}", "data-repl") == "·Canada"

    emoji = completion.index("🎉")  # code points (Python str indices), not UTF-16 units
    cjk_start, cjk_end = completion.index("東"), completion.index(" is")
    drag_select(page, emoji, emoji + 1)
    assert f"span [{emoji}, {emoji + 1})" in page.inner_text("#detail-head")
    page.click("#mark-bad")
    drag_select(page, cjk_start, cjk_end)
    assert f"span [{cjk_start}, {cjk_end})" in page.inner_text("#detail-head")
    highlighted = page.eval_on_selector_all("#tokens .tok.selected", "els => els.map(e => Number(e.dataset.pos))")
    page.click("#mark-good")
    assert [(s["start"], s["end"], s["weight"], s["text"]) for s in work(page)["spans"]] == [
        (emoji, emoji + 1, -1, "🎉"), (cjk_start, cjk_end, 1, "東京")]
    page.click("#submit")
    page.wait_for_selector("#results li[data-status=accepted]")

    # The rows are those of the policy's own alignment of these spans (docs/design.md, "Spans"): the bad
    # span's first token, every token of the good span (the byte pieces of 東 and 京 included), and
    # the typed replacement's first token in context.
    with grpc.insecure_channel(policy.address) as channel:
        stub = policy_grpc.PolicyServiceStub(channel)
        aligned = stub.AlignSpans(policy_pb2.AlignSpansRequest(
            token_ids=[t["tokenId"] for t in tokens],
            spans=[common_pb2.CharSpan(start=emoji, end=emoji + 1), common_pb2.CharSpan(start=cjk_start, end=cjk_end)],
        ))
        canada = stub.Tokenize(policy_pb2.TokenizeRequest(text=" Canada")).tokens
    assert [piece.text for piece in canada] == [" Canada"]
    bad, good = (list(a.token_positions) for a in aligned.spans)
    assert highlighted == good  # the page showed the tokens the span would be stored on
    assert bad and "🎉" in tokens[bad[0]]["text"]
    assert any(tokens[p]["text"] == "" for p in good) and {"東", "京"} <= {tokens[p]["text"] for p in good}
    expected = {
        (france["position"], france["tokenId"], False): -1.0,
        (france["position"], canada[0].token_id, True): 1.0,
        (bad[0], tokens[bad[0]]["tokenId"], False): -1.0,
    }
    expected |= {(p, tokens[p]["tokenId"], False): 1.0 for p in good}
    stored = trainer_stub(trainer).GetAnnotation(trainer_pb2.GetAnnotationRequest(annotation_id=submitted_id(page)))
    assert rows_of(stored) == expected


def test_narrow_window(page, trainer, start_label):
    """On a phone-sized window the side panel goes under the work, chips wrap, nothing scrolls
    sideways, and labelling still works."""
    _, url = start_label(connect_url(trainer))
    page.set_viewport_size({"width": 390, "height": 844})
    open_page(page, url)
    page.click("#sampling summary")
    page.fill("#max-tokens", "60")
    page.fill("#seed", "3")
    page.fill("#prompt", "Tokyo is the capital of")
    page.click("#generate")
    w = wait_done(page)
    page.click("#tok-0")
    page.click("#mark-bad")
    layout = page.evaluate("""() => {
      const box = (sel) => document.querySelector(sel).getBoundingClientRect();
      const chips = [...document.querySelectorAll('#tokens .tok')].map((c) => c.getBoundingClientRect());
      return {scroll: document.documentElement.scrollWidth, width: innerWidth, work: box('#work'), side: box('#side'),
              tokens: box('#tokens'), lines: new Set(chips.map((c) => Math.round(c.top))).size};
    }""")
    assert layout["scroll"] <= layout["width"]
    assert layout["side"]["top"] >= layout["work"]["bottom"] - 1
    assert layout["tokens"]["right"] <= layout["width"]
    assert len(w["tokens"]) < 20 or layout["lines"] > 1
    page.click("#submit")
    page.wait_for_selector("#results li[data-status=accepted]")
