// Moving around the tokens: the keyboard cursor, Shift+arrow spans, mouse selections of characters,
// jumping between suggestions, and the keys of the token strip (the page's help lists them).

import { el } from "./dom";
import { chooseAlternative, mark, setWeight } from "./labelling";
import { settings, ui } from "./state";
import { submit } from "./submit";
import { cpLength, completionText, tokensInSpan } from "./tokens";
import { chipOf, decorateAll, renderDetail } from "./view";

export function moveTo(pos: number, extend: boolean): void {
  if (!ui.work || ui.work.tokens.length === 0) return;
  const next = Math.max(0, Math.min(ui.work.tokens.length - 1, pos));
  if (extend && ui.anchor === null) ui.anchor = ui.cursor;
  if (!extend) ui.anchor = null;
  ui.mouseSpan = null;
  ui.cursor = next;
  chipOf(ui.cursor)?.scrollIntoView({ block: "nearest" });
  decorateAll();
  renderDetail();
}

function jumpSuggestion(dir: 1 | -1): void {
  const order = [...ui.suggested.keys()].sort((a, b) => a - b);
  if (!order.length) return;
  const next = dir > 0 ? order.find((p) => p > ui.cursor) ?? order[0] : [...order].reverse().find((p) => p < ui.cursor) ?? order[order.length - 1];
  moveTo(next, false);
}

/** Code-point offset in the completion of a DOM point (node, offset) inside the token strip. */
function charAt(node: Node, offset: number, isEnd: boolean): number | null {
  if (!ui.work) return null;
  const host = node.nodeType === Node.TEXT_NODE ? node.parentElement : (node as Element);
  const c = host?.closest<HTMLElement>(".tok");
  if (c && el.tokens.contains(c)) {
    const tok = ui.work.tokens[Number(c.dataset.pos)];
    // UTF-16 units of the chip's text before the point: whitespace markers stand one for one for
    // the characters they show, and the ::before/::after decorations are not text.
    const before = document.createRange();
    before.setStart(c, 0);
    before.setEnd(node, offset);
    const units = Math.min(before.toString().length, tok.text.length);
    return tok.charStart + cpLength(tok.text.slice(0, units));
  }
  if (node === el.tokens) {
    const kids = [...el.tokens.children].filter((k) => k.classList.contains("tok")) as HTMLElement[];
    const all = [...el.tokens.childNodes];
    const before = kids.filter((k) => all.indexOf(k) < offset);
    if (isEnd) return before.length ? ui.work.tokens[Number(before[before.length - 1].dataset.pos)].charEnd : 0;
    const after = kids.find((k) => all.indexOf(k) >= offset);
    return after ? ui.work.tokens[Number(after.dataset.pos)].charStart : cpLength(completionText(ui.work));
  }
  return null;
}

/** A mouse selection of characters inside the token strip becomes the span target. */
export function takeMouseSelection(): boolean {
  const sel = window.getSelection();
  if (!sel || sel.isCollapsed || sel.rangeCount === 0 || !ui.work) return false;
  const r = sel.getRangeAt(0);
  if (!el.tokens.contains(r.commonAncestorContainer)) return false;
  const start = charAt(r.startContainer, r.startOffset, false);
  const end = charAt(r.endContainer, r.endOffset, true);
  if (start === null || end === null || end <= start) return false;
  ui.mouseSpan = { start, end };
  ui.anchor = null;
  const inside = tokensInSpan(ui.work.tokens, start, end);
  if (inside.length) ui.cursor = inside[0];
  decorateAll();
  renderDetail();
  return true;
}

// ---- the keys of the token strip ------------------------------------------------------------

export function onTokenKey(e: KeyboardEvent): void {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const handled = ((): boolean => {
    switch (e.key) {
      case "ArrowRight": moveTo(ui.cursor + 1, e.shiftKey); return true;
      case "ArrowLeft": moveTo(ui.cursor - 1, e.shiftKey); return true;
      case "Home": moveTo(0, e.shiftKey); return true;
      case "End": moveTo(Number.MAX_SAFE_INTEGER, e.shiftKey); return true;
      case "b": mark(-1); return true;
      case "g": mark(1); return true;
      case "x": case "Delete": case "Backspace": mark(0); return true;
      case "+": case "=": setWeight(settings.weight + 0.1); return true;
      case "-": setWeight(settings.weight - 0.1); return true;
      case "]": jumpSuggestion(1); return true;
      case "[": jumpSuggestion(-1); return true;
      case "r": el.replacement.focus(); return true;
      case "s": void submit(); return true;
      case "Escape":
        ui.anchor = null;
        ui.mouseSpan = null;
        window.getSelection()?.removeAllRanges();
        decorateAll();
        renderDetail();
        return true;
      default:
        if (/^[1-9]$/.test(e.key)) {
          chooseAlternative(Number(e.key) - 1);
          return true;
        }
        return false;
    }
  })();
  if (handled) {
    e.preventDefault();
    e.stopPropagation();
  }
}
