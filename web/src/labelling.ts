// Labelling: marking the target (a token or a span) bad or good, choosing or typing what should
// have come instead, and the weight. Each change goes through view.changed().

import { el } from "./dom";
import { saveSettings } from "./store";
import { editable, settings, target, ui } from "./state";
import { tokensInSpan, type Span } from "./tokens";
import { changed, note, replacementsFor } from "./view";

function overlapping(spans: Span[], start: number, end: number): Span[] {
  return spans.filter((s) => s.start < end && start < s.end);
}

/** Marks the target bad (-1), good (+1) or clears it (0), with the weight slider's magnitude. */
export function mark(sign: -1 | 0 | 1): void {
  const t = target();
  if (!t || !ui.work || !editable()) return;
  const weight = sign * settings.weight;
  if (t.kind === "token") {
    const pos = t.tok.position;
    const old = ui.work.labels[pos];
    if (sign === 0) {
      delete ui.work.labels[pos]; // and every span the token belongs to
      ui.work.spans = ui.work.spans.filter((s) => !tokensInSpan(ui.work!.tokens, s.start, s.end).includes(pos));
    } else if (sign < 0) {
      ui.work.labels[pos] = { ...old, weight };
    } else {
      ui.work.labels[pos] = { weight }; // a good token has no replacement
    }
  } else {
    const kept = ui.work.spans.filter((s) => !overlapping([s], t.start, t.end).length);
    const same = ui.work.spans.find((s) => s.start === t.start && s.end === t.end);
    if (sign !== 0) kept.push({ start: t.start, end: t.end, text: t.text, weight, replacementText: sign < 0 ? same?.replacementText : undefined });
    ui.work.spans = kept;
  }
  changed();
}

/** Uses the i-th listed alternative as the bad token's replacement (again: drops it). */
export function chooseAlternative(i: number): void {
  const t = target();
  if (!t || t.kind !== "token" || !ui.work || !editable()) return;
  const alt = replacementsFor(t.tok)[i];
  if (!alt) return;
  const pos = t.tok.position;
  const old = ui.work.labels[pos];
  const weight = old && old.weight < 0 ? old.weight : -settings.weight;
  ui.work.labels[pos] = old?.replacementTokenId === alt.tokenId ? { weight } : { weight, replacementTokenId: alt.tokenId };
  changed();
}

/** Typed replacement text: the trainer tokenizes it in context (docs/design.md, "Spans"). */
export function useReplacementText(): void {
  const t = target();
  const text = el.replacement.value;
  if (!t || !ui.work || !editable()) return;
  if (text === "") return note("Type the text that should come instead first.", true);
  if (t.kind === "token") {
    if (t.tok.text === "") return note("This token carries no characters of its own; select the whole character instead.", true);
    const old = ui.work.labels[t.tok.position];
    ui.work.labels[t.tok.position] = { weight: old && old.weight < 0 ? old.weight : -settings.weight, replacementText: text };
  } else {
    const others = ui.work.spans.filter((s) => !overlapping([s], t.start, t.end).length);
    const same = ui.work.spans.find((s) => s.start === t.start && s.end === t.end);
    const weight = same && same.weight < 0 ? same.weight : -settings.weight;
    ui.work.spans = [...others, { start: t.start, end: t.end, text: t.text, weight, replacementText: text }];
  }
  changed();
  el.tokens.focus();
}

/** Sets the weight magnitude; a marked target keeps its sign and takes the new magnitude. */
export function setWeight(value: number): void {
  settings.weight = Math.round(Math.min(2, Math.max(0.1, value)) * 10) / 10;
  saveSettings(settings);
  const t = target();
  if (t && ui.work && editable()) {
    if (t.kind === "token" && ui.work.labels[t.tok.position]) {
      const label = ui.work.labels[t.tok.position];
      label.weight = Math.sign(label.weight) * settings.weight;
    } else if (t.kind === "span") {
      for (const s of ui.work.spans) if (s.start === t.start && s.end === t.end) s.weight = Math.sign(s.weight) * settings.weight;
    }
  }
  changed();
}

