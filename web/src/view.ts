// Drawing: the token chips, the line above them, the selection panel and the note under Submit.
// Everything here redraws from the state (state.ts); nothing here changes labels.

import { el } from "./dom";
import { saveWork } from "./store";
import { editable, settings, target, ui } from "./state";
import {
  band,
  BANDS,
  labelCount,
  percent,
  pieces,
  specialName,
  tokensInSpan,
  tooltip,
  VISIBLE,
  type Alt,
  type Tok,
} from "./tokens";

/** Saves the completion and redraws everything that depends on its labels. */
export function changed(): void {
  saveWork(ui.work);
  decorateAll();
  renderDetail();
  renderMeta();
}

export function note(text: string, error = false): void {
  el.submitNote.textContent = text;
  el.submitNote.classList.toggle("error", error);
}

// ---- the tokens --------------------------------------------------------------------------------
/** A chip: the token's text with its whitespace made visible, shaded by its probability band. Model text is
 * only ever set as text, never as HTML. */
export function chip(t: Tok): HTMLElement {
  const c = document.createElement("span");
  c.className = "tok";
  c.id = `tok-${t.position}`;
  c.dataset.pos = String(t.position);
  c.setAttribute("role", "option");
  c.title = tooltip(t);
  c.dataset.band = String(band(t.logprob));
  if (t.text === "") c.classList.add("empty");
  for (const p of pieces(t.text)) {
    if (p.ws) {
      const ws = document.createElement("span");
      ws.className = "ws";
      ws.textContent = p.text;
      c.append(ws);
    } else {
      c.append(p.text);
    }
  }
  return c;
}

export function appendChip(t: Tok): void {
  el.tokens.append(chip(t));
  for (const ch of t.text) if (ch === "\n") el.tokens.append(document.createElement("br"));
}

export function drawTokens(): void {
  el.tokens.replaceChildren();
  for (const t of ui.work?.tokens ?? []) appendChip(t);
  decorateAll();
}

export const chipOf = (pos: number): HTMLElement | null => document.getElementById(`tok-${pos}`);

export const shown = (s: string): string => s.replace(/[ \n\t\r]/g, (c) => VISIBLE[c]);

/** Classes of every chip from the labels, spans, suggestions and selection. */
export function decorateAll(): void {
  if (!ui.work) return;
  const spanSign = new Map<number, number>();
  for (const s of ui.work.spans) for (const p of tokensInSpan(ui.work.tokens, s.start, s.end)) spanSign.set(p, Math.sign(s.weight));
  const t = target();
  const selected = new Set(t?.kind === "span" ? tokensInSpan(ui.work.tokens, t.start, t.end) : []);
  for (const tok of ui.work.tokens) {
    const c = chipOf(tok.position);
    if (!c) continue;
    const label = ui.work.labels[tok.position];
    c.classList.toggle("bad", !!label && label.weight < 0);
    c.classList.toggle("good", !!label && label.weight > 0);
    c.classList.toggle("span-bad", spanSign.get(tok.position) === -1);
    c.classList.toggle("span-good", spanSign.get(tok.position) === 1);
    c.classList.toggle("suggested", ui.suggested.has(tok.position));
    c.classList.toggle("cursor", tok.position === ui.cursor);
    c.classList.toggle("selected", selected.has(tok.position));
    c.setAttribute("aria-selected", String(tok.position === ui.cursor || selected.has(tok.position)));
    const repl = label?.replacementText ?? tok.alternatives.find((a) => a.tokenId === label?.replacementTokenId)?.text;
    if (repl !== undefined) c.dataset.repl = shown(repl);
    else delete c.dataset.repl;
    const name = specialName(ui.work, tok, ui.special);
    if (name !== undefined) c.dataset.special = name;
    else delete c.dataset.special;
    c.title = tooltip(tok) + (ui.suggested.has(tok.position) ? ` · suggested (${ui.suggested.get(tok.position)})` : "");
  }
  if (ui.work.tokens.length) el.tokens.setAttribute("aria-activedescendant", `tok-${ui.cursor}`);
}

export function renderMeta(): void {
  if (!ui.work) {
    el.meta.textContent = "";
    el.stale.hidden = true;
    el.promptEcho.textContent = "";
    el.suggestInfo.textContent = "";
    return;
  }
  const parts = [
    ui.work.source === "score" ? "scored" : "generated",
    `v${ui.work.modelVersion}`,
    `${ui.work.tokens.length} tokens`,
    ui.work.done ? ui.work.finish : "streaming…",
    `${labelCount(ui.work)} labels`,
  ];
  if (ui.work.submitted) parts.push(`submitted (${ui.work.submitted})`);
  el.meta.textContent = parts.join(" · ");
  el.meta.dataset.annotationId = ui.work.annotationId;
  const stale = ui.policyVersion > ui.work.modelVersion;
  el.stale.hidden = !stale;
  el.stale.textContent = stale ? `stale: made by v${ui.work.modelVersion}, the policy is now v${ui.policyVersion}` : "";
  el.promptEcho.textContent = `prompt: ${ui.work.promptText}`;
  el.suggestInfo.textContent = ui.suggested.size ? `${ui.suggested.size} suggested — ] jumps to the next` : "";
  el.submit.disabled = !ui.work.done || !!ui.work.submitted;
}

/** The legend of the chips' shading: one swatch per probability band, shaded as the chips are. */
export function drawLegend(): void {
  el.legend.replaceChildren(
    Object.assign(document.createElement("span"), { textContent: "probability under the policy:", className: "muted" }),
    ...BANDS.map((b, i) => {
      const s = Object.assign(document.createElement("span"), { textContent: b.label, className: "swatch" });
      s.dataset.band = String(i);
      return s;
    }),
  );
}

// ---- the selection panel ---------------------------------------------------------------------

let lastTargetKey = "";

export function renderDetail(): void {
  const t = target();
  const canEdit = t !== null && editable();
  for (const b of [el.markBad, el.markGood, el.markClear, el.useReplacement]) b.disabled = !canEdit;
  el.replacement.disabled = !canEdit;
  el.weight.value = String(settings.weight);
  el.weightOut.value = settings.weight.toFixed(1);
  el.alts.replaceChildren();
  const key = t === null ? "" : t.kind === "token" ? `t${t.tok.position}` : `s${t.start}-${t.end}`;
  if (t === null || !ui.work) {
    el.altsBox.hidden = true;
    el.detailHead.textContent = "Generate a completion, then click a token or use the arrow keys.";
    lastTargetKey = key;
    return;
  }
  let replacementText: string | undefined;
  if (t.kind === "token") {
    const tok = t.tok;
    const label = ui.work.labels[tok.position];
    replacementText = label?.replacementText;
    const state = label ? ` — marked ${label.weight < 0 ? "bad" : "good"} (${label.weight.toFixed(1)})` : "";
    el.detailHead.textContent = `#${tok.position} ${JSON.stringify(tok.text)} · ${tooltip(tok)}${state}` +
      (ui.suggested.has(tok.position) ? ` · suggested: ${ui.suggested.get(tok.position)}` : "");
    const alts = replacementsFor(tok);
    el.altsBox.hidden = false;
    alts.forEach((a, i) => {
      const li = document.createElement("li");
      li.dataset.tokenId = String(a.tokenId);
      li.classList.toggle("chosen", label?.replacementTokenId === a.tokenId);
      li.append(shown(a.text) || "◌");
      const p = document.createElement("span");
      p.className = "p";
      p.textContent = percent(a.logprob); // the list's own number is the key that chooses it
      li.append(p);
      li.dataset.index = String(i); // a click chooses it (main.ts)
      el.alts.append(li);
    });
    if (alts.length === 0) el.alts.append(Object.assign(document.createElement("li"), { textContent: "no alternatives streamed" }));
  } else {
    const span = ui.work.spans.find((s) => s.start === t.start && s.end === t.end);
    replacementText = span?.replacementText;
    const positions = tokensInSpan(ui.work.tokens, t.start, t.end);
    const state = span ? ` — marked ${span.weight < 0 ? "bad" : "good"} (${span.weight.toFixed(1)})` : "";
    el.detailHead.textContent = `span [${t.start}, ${t.end}) ${JSON.stringify(t.text)} · tokens ${positions.join(", ")}${state}`;
    el.altsBox.hidden = true;
  }
  if (key !== lastTargetKey) el.replacement.value = replacementText ?? "";
  lastTargetKey = key;
}

/** The top-k alternatives a bad token could be replaced by (the sampled token itself left out). */
export function replacementsFor(tok: Tok): Alt[] {
  return tok.alternatives.filter((a) => a.tokenId !== tok.tokenId);
}

