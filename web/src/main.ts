// The labeling page: generate (or score) a completion, watch its tokens stream in as chips, mark
// tokens and spans good or bad with replacements, submit to the trainer, watch the trainer.
// State lives in a few variables below; every change goes through `changed()`, which saves it and
// redraws what depends on it. tokens.ts decides what things mean; this file draws and listens.

import { FinishReason } from "../gen/tokenfeedback/v1/policy_pb";
import type { GenerateEvent, ModelInfo, ScoredToken, TokenEvent } from "../gen/tokenfeedback/v1/policy_pb";
import { SubmitStatus, type TrainerStatus } from "../gen/tokenfeedback/v1/trainer_pb";
import { describe, isAbort, policy, setBearer, trainer } from "./api";
import { loadSettings, loadWork, Outbox, saveSettings, saveWork } from "./store";
import {
  completionText,
  cpLength,
  cpSlice,
  labelCount,
  newWork,
  percent,
  pieces,
  suggestions,
  toSequence,
  tokensInSpan,
  tooltip,
  unlikeliness,
  VISIBLE,
  type Alt,
  type Span,
  type Tok,
  type Work,
} from "./tokens";

const $ = <T extends HTMLElement = HTMLElement>(id: string): T => {
  const found = document.getElementById(id);
  if (!found) throw new Error(`index.html has no #${id}`);
  return found as T;
};

const el = {
  modelInfo: $("model-info"),
  helpToggle: $<HTMLButtonElement>("help-toggle"),
  help: $("help"),
  promptForm: $<HTMLFormElement>("prompt-form"),
  prompt: $<HTMLTextAreaElement>("prompt"),
  generate: $<HTMLButtonElement>("generate"),
  stop: $<HTMLButtonElement>("stop"),
  nextPrompt: $<HTMLButtonElement>("next-prompt"),
  promptListInfo: $("prompt-list-info"),
  maxTokens: $<HTMLInputElement>("max-tokens"),
  temperature: $<HTMLInputElement>("temperature"),
  alternatives: $<HTMLInputElement>("alternatives"),
  seed: $<HTMLInputElement>("seed"),
  given: $<HTMLTextAreaElement>("given"),
  score: $<HTMLButtonElement>("score"),
  meta: $("completion-meta"),
  stale: $("stale"),
  suggestInfo: $("suggest-info"),
  promptEcho: $("prompt-echo"),
  tokens: $("tokens"),
  detailHead: $("detail-head"),
  markBad: $<HTMLButtonElement>("mark-bad"),
  markGood: $<HTMLButtonElement>("mark-good"),
  markClear: $<HTMLButtonElement>("mark-clear"),
  weight: $<HTMLInputElement>("weight"),
  weightOut: $<HTMLOutputElement>("weight-out"),
  altsBox: $("alts-box"),
  alts: $<HTMLOListElement>("alts"),
  replacement: $<HTMLInputElement>("replacement"),
  useReplacement: $<HTMLButtonElement>("use-replacement"),
  submit: $<HTMLButtonElement>("submit"),
  sendUnsent: $<HTMLButtonElement>("send-unsent"),
  suggest: $<HTMLInputElement>("suggest"),
  submitNote: $("submit-note"),
  results: $<HTMLUListElement>("results"),
  status: $("status"),
  trainSteps: $<HTMLInputElement>("train-steps"),
  train: $<HTMLButtonElement>("train"),
  trainLog: $<HTMLOListElement>("train-log"),
  outbox: $<HTMLUListElement>("outbox"),
  outboxCount: $("outbox-count"),
  annotator: $<HTMLInputElement>("annotator"),
  bearer: $<HTMLInputElement>("bearer"),
};

// ---- state -------------------------------------------------------------------------------------

const settings = loadSettings();
const outbox = new Outbox();
let work: Work | null = loadWork();
/** The token the keyboard is on; with `anchor` set, Shift+arrows select the tokens between them. */
let cursor = 0;
let anchor: number | null = null;
/** Characters selected with the mouse (code points into the completion text). */
let mouseSpan: { start: number; end: number } | null = null;
let suggested = new Map<number, string>();
/** The policy's current model version (GetModelInfo); -1 until known. */
let policyVersion = -1;
/** Special tokens by id ("eos", ...), from GetModelInfo: drawn by name, since they add no text. */
let special = new Map<number, string>();
let generating: AbortController | null = null;
let prompts: string[] = [];

/** What the buttons and keys act on: the token under the cursor, or a span. */
type Target = { kind: "token"; tok: Tok } | { kind: "span"; start: number; end: number; text: string };

function target(): Target | null {
  if (!work || work.tokens.length === 0) return null;
  const text = completionText(work);
  if (mouseSpan) return { kind: "span", ...mouseSpan, text: cpSlice(text, mouseSpan.start, mouseSpan.end) };
  if (anchor !== null && anchor !== cursor) {
    const [a, b] = [Math.min(anchor, cursor), Math.max(anchor, cursor)];
    const start = work.tokens[a].charStart;
    const end = work.tokens[b].charEnd;
    return { kind: "span", start, end, text: cpSlice(text, start, end) };
  }
  return { kind: "token", tok: work.tokens[cursor] };
}

const editable = (): boolean => work !== null && !work.submitted;

/** Saves the completion and redraws everything that depends on its labels. */
function changed(): void {
  saveWork(work);
  decorateAll();
  renderDetail();
  renderMeta();
}

// ---- drawing the tokens --------------------------------------------------------------------------

function fromEvent(t: TokenEvent | ScoredToken, version: number): Tok {
  const alternatives: Alt[] = t.alternatives.map((a) => ({ tokenId: a.tokenId, text: a.text, logprob: a.logprob }));
  return {
    position: t.position,
    tokenId: t.tokenId,
    text: t.text,
    charStart: t.charStart,
    charEnd: t.charEnd,
    logprob: t.logprob,
    samplingLogprob: "samplingLogprob" in t ? t.samplingLogprob : null,
    rank: t.rank,
    alternatives,
    modelVersion: "modelVersion" in t ? Number(t.modelVersion) : version,
  };
}

/** A chip: the token's text with its whitespace made visible, shaded by its logprob. Model text is
 * only ever set as text, never as HTML. */
function chip(t: Tok): HTMLElement {
  const c = document.createElement("span");
  c.className = "tok";
  c.id = `tok-${t.position}`;
  c.dataset.pos = String(t.position);
  c.setAttribute("role", "option");
  c.title = tooltip(t);
  c.style.setProperty("--u", unlikeliness(t.logprob).toFixed(3));
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

function appendChip(t: Tok): void {
  el.tokens.append(chip(t));
  for (const ch of t.text) if (ch === "\n") el.tokens.append(document.createElement("br"));
}

function drawTokens(): void {
  el.tokens.replaceChildren();
  for (const t of work?.tokens ?? []) appendChip(t);
  decorateAll();
}

const chipOf = (pos: number): HTMLElement | null => document.getElementById(`tok-${pos}`);

const shown = (s: string): string => s.replace(/[ \n\t\r]/g, (c) => VISIBLE[c]);

/** Classes of every chip from the labels, spans, suggestions and selection. */
function decorateAll(): void {
  if (!work) return;
  const spanSign = new Map<number, number>();
  for (const s of work.spans) for (const p of tokensInSpan(work.tokens, s.start, s.end)) spanSign.set(p, Math.sign(s.weight));
  const t = target();
  const selected = new Set(t?.kind === "span" ? tokensInSpan(work.tokens, t.start, t.end) : []);
  for (const tok of work.tokens) {
    const c = chipOf(tok.position);
    if (!c) continue;
    const label = work.labels[tok.position];
    c.classList.toggle("bad", !!label && label.weight < 0);
    c.classList.toggle("good", !!label && label.weight > 0);
    c.classList.toggle("span-bad", spanSign.get(tok.position) === -1);
    c.classList.toggle("span-good", spanSign.get(tok.position) === 1);
    c.classList.toggle("suggested", suggested.has(tok.position));
    c.classList.toggle("cursor", tok.position === cursor);
    c.classList.toggle("selected", selected.has(tok.position));
    c.setAttribute("aria-selected", String(tok.position === cursor || selected.has(tok.position)));
    const repl = label?.replacementText ?? tok.alternatives.find((a) => a.tokenId === label?.replacementTokenId)?.text;
    if (repl !== undefined) c.dataset.repl = shown(repl);
    else delete c.dataset.repl;
    if (tok.text === "" && special.has(tok.tokenId)) c.dataset.special = special.get(tok.tokenId);
    c.title = tooltip(tok) + (suggested.has(tok.position) ? ` · suggested (${suggested.get(tok.position)})` : "");
  }
  if (work.tokens.length) el.tokens.setAttribute("aria-activedescendant", `tok-${cursor}`);
}

function renderMeta(): void {
  if (!work) {
    el.meta.textContent = "";
    el.stale.hidden = true;
    el.promptEcho.textContent = "";
    el.suggestInfo.textContent = "";
    return;
  }
  const parts = [
    work.source === "score" ? "scored" : "generated",
    `v${work.modelVersion}`,
    `${work.tokens.length} tokens`,
    work.done ? work.finish : "streaming…",
    `${labelCount(work)} labels`,
  ];
  if (work.submitted) parts.push(`submitted (${work.submitted})`);
  el.meta.textContent = parts.join(" · ");
  el.meta.dataset.annotationId = work.annotationId;
  const stale = policyVersion > work.modelVersion;
  el.stale.hidden = !stale;
  el.stale.textContent = stale ? `stale: made by v${work.modelVersion}, the policy is now v${policyVersion}` : "";
  el.promptEcho.textContent = `prompt: ${work.promptText}`;
  el.suggestInfo.textContent = suggested.size ? `${suggested.size} suggested — ] jumps to the next` : "";
  el.submit.disabled = !work.done || !!work.submitted;
}

// ---- the selection panel ---------------------------------------------------------------------

let lastTargetKey = "";

function renderDetail(): void {
  const t = target();
  const canEdit = t !== null && editable();
  for (const b of [el.markBad, el.markGood, el.markClear, el.useReplacement]) b.disabled = !canEdit;
  el.replacement.disabled = !canEdit;
  el.weight.value = String(settings.weight);
  el.weightOut.value = settings.weight.toFixed(1);
  el.alts.replaceChildren();
  const key = t === null ? "" : t.kind === "token" ? `t${t.tok.position}` : `s${t.start}-${t.end}`;
  if (t === null || !work) {
    el.altsBox.hidden = true;
    el.detailHead.textContent = "Generate a completion, then click a token or use the arrow keys.";
    lastTargetKey = key;
    return;
  }
  let replacementText: string | undefined;
  if (t.kind === "token") {
    const tok = t.tok;
    const label = work.labels[tok.position];
    replacementText = label?.replacementText;
    const state = label ? ` — marked ${label.weight < 0 ? "bad" : "good"} (${label.weight.toFixed(1)})` : "";
    el.detailHead.textContent = `#${tok.position} ${JSON.stringify(tok.text)} · ${tooltip(tok)}${state}` +
      (suggested.has(tok.position) ? ` · suggested: ${suggested.get(tok.position)}` : "");
    const alts = replacementsFor(tok);
    el.altsBox.hidden = false;
    alts.forEach((a, i) => {
      const li = document.createElement("li");
      li.dataset.tokenId = String(a.tokenId);
      li.classList.toggle("chosen", label?.replacementTokenId === a.tokenId);
      li.append(shown(a.text) || "◌");
      const p = document.createElement("span");
      p.className = "p";
      p.textContent = `${percent(a.logprob)}${i < 9 ? `  (${i + 1})` : ""}`;
      li.append(p);
      li.addEventListener("click", () => chooseAlternative(i));
      el.alts.append(li);
    });
    if (alts.length === 0) el.alts.append(Object.assign(document.createElement("li"), { textContent: "no alternatives streamed" }));
  } else {
    const span = work.spans.find((s) => s.start === t.start && s.end === t.end);
    replacementText = span?.replacementText;
    const positions = tokensInSpan(work.tokens, t.start, t.end);
    const state = span ? ` — marked ${span.weight < 0 ? "bad" : "good"} (${span.weight.toFixed(1)})` : "";
    el.detailHead.textContent = `span [${t.start}, ${t.end}) ${JSON.stringify(t.text)} · tokens ${positions.join(", ")}${state}`;
    el.altsBox.hidden = true;
  }
  if (key !== lastTargetKey) el.replacement.value = replacementText ?? "";
  lastTargetKey = key;
}

/** The top-k alternatives a bad token could be replaced by (the sampled token itself left out). */
function replacementsFor(tok: Tok): Alt[] {
  return tok.alternatives.filter((a) => a.tokenId !== tok.tokenId);
}

// ---- labelling -------------------------------------------------------------------------------

function overlapping(spans: Span[], start: number, end: number): Span[] {
  return spans.filter((s) => s.start < end && start < s.end);
}

/** Marks the target bad (-1), good (+1) or clears it (0), with the weight slider's magnitude. */
function mark(sign: -1 | 0 | 1): void {
  const t = target();
  if (!t || !work || !editable()) return;
  const weight = sign * settings.weight;
  if (t.kind === "token") {
    const pos = t.tok.position;
    const old = work.labels[pos];
    if (sign === 0) {
      delete work.labels[pos]; // and every span the token belongs to
      work.spans = work.spans.filter((s) => !tokensInSpan(work!.tokens, s.start, s.end).includes(pos));
    } else if (sign < 0) {
      work.labels[pos] = { ...old, weight };
    } else {
      work.labels[pos] = { weight }; // a good token has no replacement
    }
  } else {
    const kept = work.spans.filter((s) => !overlapping([s], t.start, t.end).length);
    const same = work.spans.find((s) => s.start === t.start && s.end === t.end);
    if (sign !== 0) kept.push({ start: t.start, end: t.end, text: t.text, weight, replacementText: sign < 0 ? same?.replacementText : undefined });
    work.spans = kept;
  }
  changed();
}

/** Uses the i-th listed alternative as the bad token's replacement (again: drops it). */
function chooseAlternative(i: number): void {
  const t = target();
  if (!t || t.kind !== "token" || !work || !editable()) return;
  const alt = replacementsFor(t.tok)[i];
  if (!alt) return;
  const pos = t.tok.position;
  const old = work.labels[pos];
  const weight = old && old.weight < 0 ? old.weight : -settings.weight;
  work.labels[pos] = old?.replacementTokenId === alt.tokenId ? { weight } : { weight, replacementTokenId: alt.tokenId };
  changed();
}

/** Typed replacement text: the trainer tokenizes it in context (DESIGN.md, "Spans"). */
function useReplacementText(): void {
  const t = target();
  const text = el.replacement.value;
  if (!t || !work || !editable()) return;
  if (text === "") return note("Type the text that should come instead first.", true);
  if (t.kind === "token") {
    if (t.tok.text === "") return note("This token carries no characters of its own; select the whole character instead.", true);
    const old = work.labels[t.tok.position];
    work.labels[t.tok.position] = { weight: old && old.weight < 0 ? old.weight : -settings.weight, replacementText: text };
  } else {
    const others = work.spans.filter((s) => !overlapping([s], t.start, t.end).length);
    const same = work.spans.find((s) => s.start === t.start && s.end === t.end);
    const weight = same && same.weight < 0 ? same.weight : -settings.weight;
    work.spans = [...others, { start: t.start, end: t.end, text: t.text, weight, replacementText: text }];
  }
  changed();
  el.tokens.focus();
}

/** Sets the weight magnitude; a marked target keeps its sign and takes the new magnitude. */
function setWeight(value: number): void {
  settings.weight = Math.round(Math.min(2, Math.max(0.1, value)) * 10) / 10;
  saveSettings(settings);
  const t = target();
  if (t && work && editable()) {
    if (t.kind === "token" && work.labels[t.tok.position]) {
      const label = work.labels[t.tok.position];
      label.weight = Math.sign(label.weight) * settings.weight;
    } else if (t.kind === "span") {
      for (const s of work.spans) if (s.start === t.start && s.end === t.end) s.weight = Math.sign(s.weight) * settings.weight;
    }
  }
  changed();
}

// ---- moving around -------------------------------------------------------------------------------

function moveTo(pos: number, extend: boolean): void {
  if (!work || work.tokens.length === 0) return;
  const next = Math.max(0, Math.min(work.tokens.length - 1, pos));
  if (extend && anchor === null) anchor = cursor;
  if (!extend) anchor = null;
  mouseSpan = null;
  cursor = next;
  chipOf(cursor)?.scrollIntoView({ block: "nearest" });
  decorateAll();
  renderDetail();
}

function jumpSuggestion(dir: 1 | -1): void {
  const order = [...suggested.keys()].sort((a, b) => a - b);
  if (!order.length) return;
  const next = dir > 0 ? order.find((p) => p > cursor) ?? order[0] : [...order].reverse().find((p) => p < cursor) ?? order[order.length - 1];
  moveTo(next, false);
}

/** Code-point offset in the completion of a DOM point (node, offset) inside the token strip. */
function charAt(node: Node, offset: number, isEnd: boolean): number | null {
  if (!work) return null;
  const host = node.nodeType === Node.TEXT_NODE ? node.parentElement : (node as Element);
  const c = host?.closest<HTMLElement>(".tok");
  if (c && el.tokens.contains(c)) {
    const tok = work.tokens[Number(c.dataset.pos)];
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
    if (isEnd) return before.length ? work.tokens[Number(before[before.length - 1].dataset.pos)].charEnd : 0;
    const after = kids.find((k) => all.indexOf(k) >= offset);
    return after ? work.tokens[Number(after.dataset.pos)].charStart : cpLength(completionText(work));
  }
  return null;
}

/** A mouse selection of characters inside the token strip becomes the span target. */
function takeMouseSelection(): boolean {
  const sel = window.getSelection();
  if (!sel || sel.isCollapsed || sel.rangeCount === 0 || !work) return false;
  const r = sel.getRangeAt(0);
  if (!el.tokens.contains(r.commonAncestorContainer)) return false;
  const start = charAt(r.startContainer, r.startOffset, false);
  const end = charAt(r.endContainer, r.endOffset, true);
  if (start === null || end === null || end <= start) return false;
  mouseSpan = { start, end };
  anchor = null;
  const inside = tokensInSpan(work.tokens, start, end);
  if (inside.length) cursor = inside[0];
  decorateAll();
  renderDetail();
  return true;
}

// ---- generating and scoring ----------------------------------------------------------------------

function begin(w: Work): void {
  work = w;
  cursor = 0;
  anchor = null;
  mouseSpan = null;
  suggested = new Map();
  saveWork(w);
  drawTokens();
  renderMeta();
  renderDetail();
}

/** After the last token: suggestions, the cursor on the first of them, and the focus on the
 * tokens unless the annotator went elsewhere meanwhile (the side panel, say). */
function finish(w: Work): void {
  w.done = true;
  if (work !== w) return;
  suggested = settings.suggest ? suggestions(w.tokens) : new Map();
  cursor = suggested.size ? Math.min(...suggested.keys()) : 0;
  changed();
  const at = document.activeElement;
  const idle = !at || at === document.body || el.promptForm.contains(at) || el.tokens.contains(at);
  if (idle && w.tokens.length) el.tokens.focus();
}

function okToReplace(): boolean {
  if (!work || work.submitted || labelCount(work) === 0) return true;
  return window.confirm("The current completion has labels that were not submitted. Drop them?");
}

function samplingParams() {
  const temperature = Number(el.temperature.value);
  return {
    maxNewTokens: Number(el.maxTokens.value) || 32,
    temperature: Number.isFinite(temperature) ? temperature : 1,
    numAlternatives: Number(el.alternatives.value) || 0,
    seed: el.seed.value.trim() === "" ? undefined : BigInt(el.seed.value.trim()),
  };
}

async function generate(): Promise<void> {
  const promptText = el.prompt.value;
  if (promptText.trim() === "") return note("Type a prompt first.", true);
  if (!okToReplace()) return;
  generating?.abort();
  const ctl = new AbortController();
  generating = ctl;
  const w = newWork("generate", promptText);
  begin(w);
  el.stop.hidden = false;
  try {
    const stream = policy.generate({ promptText, params: samplingParams() }, { signal: ctl.signal });
    for await (const ev of stream as AsyncIterable<GenerateEvent>) {
      if (work !== w) break;
      const e = ev.event;
      if (e.case === "start") {
        w.generationId = e.value.generationId;
        w.promptTokenIds = e.value.promptTokenIds;
        w.promptText = e.value.promptText;
        w.modelVersion = Number(e.value.modelVersion);
        renderMeta();
      } else if (e.case === "token") {
        const tok = fromEvent(e.value, w.modelVersion);
        w.tokens.push(tok);
        appendChip(tok);
        if (w.tokens.length === 1) {
          decorateAll();
          renderDetail();
        }
        el.meta.textContent = `generating · v${w.modelVersion} · ${w.tokens.length} tokens`;
      } else if (e.case === "end") {
        w.finish = FinishReason[e.value.finishReason].toLowerCase();
      }
    }
  } catch (err) {
    w.finish = isAbort(err) ? "stopped" : `failed (${describe(err)})`;
    if (!isAbort(err)) note(`Generate failed: ${describe(err)}`, true);
  } finally {
    if (generating === ctl) generating = null;
    el.stop.hidden = true;
    finish(w);
  }
}

async function score(): Promise<void> {
  const promptText = el.prompt.value;
  const completion = el.given.value;
  if (promptText === "" || completion === "") return note("Scoring needs a prompt and a completion.", true);
  if (!okToReplace()) return;
  const w = newWork("score", promptText);
  begin(w);
  try {
    const res = await policy.score({ promptText, completionText: completion, numAlternatives: samplingParams().numAlternatives });
    w.promptTokenIds = res.promptTokenIds;
    w.modelVersion = Number(res.modelVersion);
    w.tokens = res.tokens.map((t) => fromEvent(t, w.modelVersion));
    w.finish = "scored";
    drawTokens();
  } catch (err) {
    w.finish = `failed (${describe(err)})`;
    note(`Score failed: ${describe(err)}`, true);
  }
  finish(w);
}

function nextPrompt(): void {
  if (!prompts.length) return;
  el.prompt.value = prompts[settings.promptIndex % prompts.length];
  settings.promptIndex = (settings.promptIndex + 1) % prompts.length;
  saveSettings(settings);
  renderPromptList();
  void generate();
}

function renderPromptList(): void {
  el.nextPrompt.hidden = prompts.length === 0;
  el.promptListInfo.textContent = prompts.length ? `prompt list: next is ${settings.promptIndex + 1} of ${prompts.length}` : "";
}

// ---- submitting --------------------------------------------------------------------------------------

function note(text: string, error = false): void {
  el.submitNote.textContent = text;
  el.submitNote.classList.toggle("error", error);
}

function addResult(id: string, status: string, text: string): void {
  const li = document.createElement("li");
  li.dataset.status = status;
  li.dataset.annotationId = id;
  li.textContent = `${status}${text ? ` · ${text}` : ""} · ${id.slice(0, 8)}`;
  el.results.prepend(li);
  while (el.results.children.length > 20) el.results.lastElementChild?.remove();
}

async function submit(): Promise<void> {
  if (!work || !work.done) return note("Nothing finished to submit yet.", true);
  if (work.submitted) return note("This completion was submitted already; generate the next one.", true);
  if (labelCount(work) === 0) return note("Mark at least one token or span first.", true);
  outbox.put(toSequence(work, settings.annotator));
  await flush();
}

/** Sends every unsent annotation in one SubmitAnnotations call (partial_ok, so one bad sequence
 * does not hold back the others). Only ACCEPTED and DUPLICATE take one out of the outbox. */
async function flush(): Promise<void> {
  const entries = outbox.unsent();
  if (!entries.length) return renderOutbox();
  note(`Sending ${entries.length}…`);
  try {
    const res = await trainer.submitAnnotations({ sequences: entries.map((e) => outbox.sequence(e)), partialOk: true });
    const counts: string[] = [];
    for (const r of res.results) {
      const status = SubmitStatus[r.status].toLowerCase();
      counts.push(status);
      if (r.status === SubmitStatus.ACCEPTED || r.status === SubmitStatus.DUPLICATE) {
        outbox.remove(r.annotationId);
        if (work?.annotationId === r.annotationId) work.submitted = status;
        addResult(r.annotationId, status, r.status === SubmitStatus.ACCEPTED ? `${r.rows} rows` : "stored before");
      } else {
        outbox.mark(r.annotationId, "rejected", r.reason);
        addResult(r.annotationId, status, r.reason);
      }
    }
    note(`Trainer answered: ${counts.join(", ")}.`, counts.includes("rejected"));
  } catch (err) {
    const why = describe(err);
    for (const e of entries) outbox.mark(e.id, "unsent", `not sent: ${why}`);
    note(`Submit failed (${why}). ${entries.length} kept unsent here; they go out with the next submit or Send unsent.`, true);
  }
  saveWork(work);
  renderOutbox();
  renderMeta();
  renderDetail();
  void poll();
}

function renderOutbox(): void {
  el.outbox.replaceChildren();
  for (const e of outbox.all()) {
    const li = document.createElement("li");
    li.dataset.annotationId = e.id;
    li.dataset.state = e.state;
    li.textContent = `${e.state} · ${e.id.slice(0, 8)}${e.note ? ` · ${e.note}` : ""} `;
    const drop = document.createElement("button");
    drop.type = "button";
    drop.textContent = "Discard";
    drop.addEventListener("click", () => {
      outbox.remove(e.id);
      renderOutbox();
    });
    li.append(drop);
    el.outbox.append(li);
  }
  const unsent = outbox.unsent().length;
  el.outboxCount.textContent = outbox.all().length ? `(${outbox.all().length})` : "";
  el.sendUnsent.hidden = unsent === 0;
  el.sendUnsent.textContent = `Send unsent (${unsent})`;
}

// ---- the trainer side panel ------------------------------------------------------------------

function dl(rows: [string, string][]): void {
  el.status.replaceChildren(
    ...rows.flatMap(([k, v]) => [
      Object.assign(document.createElement("dt"), { textContent: k }),
      Object.assign(document.createElement("dd"), { textContent: v }),
    ]),
  );
}

/** Fixed digits; a value that rounds to zero shows as 0 (no "-0.0000" from rounding noise). */
const num = (x: number, digits = 4): string =>
  Number.isFinite(x) ? (Math.abs(x) < 0.5 * 10 ** -digits ? 0 : x).toFixed(digits) : String(x);

function renderStatus(st: PromiseSettledResult<TrainerStatus>, mi: PromiseSettledResult<ModelInfo>): void {
  if (mi.status === "fulfilled") {
    policyVersion = Number(mi.value.modelVersion);
    special = new Map(mi.value.specialTokens.map((t) => [t.tokenId, t.role]));
    el.modelInfo.textContent = `${mi.value.modelName} · policy v${policyVersion} · ${mi.value.device}`;
  } else {
    el.modelInfo.textContent = `policy: ${describe(mi.reason)}`;
  }
  if (st.status === "rejected") {
    dl([["trainer", describe(st.reason)]]);
    el.status.dataset.reachable = "false";
    return;
  }
  const s = st.value;
  el.status.dataset.reachable = "true";
  el.status.dataset.total = String(s.annotationsTotal);
  dl([
    ["stored", String(s.annotationsTotal)],
    ["pending", String(s.annotationsPending)],
    ["consumed", String(s.annotationsConsumed)],
    ["withdrawn", String(s.annotationsWithdrawn)],
    ["rows", String(s.rowsTotal)],
    ["version", `v${s.modelVersion}`],
    ["step", String(s.step)],
    ["last loss", num(s.lastLoss)],
    ["token loss", num(s.lastTokenLoss)],
    ["KL", num(s.lastKl, 5)],
    ["loss", `${s.variant}, beta ${s.beta}, horizon ${s.horizon}, gamma ${s.gamma}`],
    ["training", s.training ? "yes" : "no"],
    ...s.policies.map((p): [string, string] => [p.address, p.reachable ? `v${p.modelVersion}` : `unreachable ${p.lastError}`]),
  ]);
}

let polling: Promise<void> | null = null;

/** GetStatus and GetModelInfo, every few seconds and after every submit or training run. */
function poll(): Promise<void> {
  polling ??= Promise.allSettled([trainer.getStatus({}), policy.getModelInfo({})])
    .then(([st, mi]) => {
      renderStatus(st, mi);
      renderMeta();
      decorateAll();
    })
    .finally(() => {
      polling = null;
    });
  return polling;
}

async function train(): Promise<void> {
  el.train.disabled = true;
  el.trainLog.replaceChildren();
  const line = (text: string, cls = ""): void => {
    const li = Object.assign(document.createElement("li"), { textContent: text, className: cls });
    el.trainLog.append(li);
    li.scrollIntoView({ block: "nearest" });
  };
  try {
    for await (const p of trainer.train({ steps: Number(el.trainSteps.value) || 0 })) {
      if (p.done) {
        line(`done: ${p.message || "finished"}${p.publishedVersion ? ` · published v${p.publishedVersion}` : ""}`, "done");
      } else {
        line(`step ${p.step}/${p.totalSteps} · loss ${num(p.loss)} (token ${num(p.tokenLoss)}, KL ${num(p.kl, 5)}) · ${p.rows} rows${p.skipped ? " · skipped" : ""}`);
      }
      void poll();
    }
  } catch (err) {
    line(`train failed: ${describe(err)}`, "error");
  } finally {
    el.train.disabled = false;
    void poll();
  }
}

// ---- wiring ----------------------------------------------------------------------------------

function bindSettings(): void {
  el.maxTokens.value = String(settings.maxTokens);
  el.temperature.value = String(settings.temperature);
  el.alternatives.value = String(settings.alternatives);
  el.seed.value = settings.seed;
  el.suggest.checked = settings.suggest;
  el.annotator.value = settings.annotator;
  el.bearer.value = settings.bearer;
  setBearer(settings.bearer);
  const sync = (): void => {
    settings.maxTokens = Number(el.maxTokens.value) || 32;
    settings.temperature = Number(el.temperature.value);
    settings.alternatives = Number(el.alternatives.value) || 0;
    settings.seed = el.seed.value;
    settings.annotator = el.annotator.value;
    settings.bearer = el.bearer.value;
    setBearer(settings.bearer);
    saveSettings(settings);
  };
  for (const i of [el.maxTokens, el.temperature, el.alternatives, el.seed, el.annotator, el.bearer]) i.addEventListener("change", sync);
  el.suggest.addEventListener("change", () => {
    settings.suggest = el.suggest.checked;
    saveSettings(settings);
    suggested = settings.suggest && work ? suggestions(work.tokens) : new Map();
    changed();
  });
}

function onTokenKey(e: KeyboardEvent): void {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const handled = ((): boolean => {
    switch (e.key) {
      case "ArrowRight": moveTo(cursor + 1, e.shiftKey); return true;
      case "ArrowLeft": moveTo(cursor - 1, e.shiftKey); return true;
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
        anchor = null;
        mouseSpan = null;
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

function wire(): void {
  $("you").addEventListener("submit", (e) => e.preventDefault());
  el.promptForm.addEventListener("submit", (e) => {
    e.preventDefault();
    void generate();
  });
  el.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      void generate();
    }
  });
  el.stop.addEventListener("click", () => generating?.abort());
  el.nextPrompt.addEventListener("click", nextPrompt);
  el.score.addEventListener("click", () => void score());
  el.tokens.addEventListener("keydown", onTokenKey);
  el.tokens.addEventListener("mouseup", () => {
    takeMouseSelection();
  });
  el.tokens.addEventListener("click", (e) => {
    const sel = window.getSelection();
    if (sel && !sel.isCollapsed) return; // a drag: the mouseup took it as a span
    const c = (e.target as Element).closest<HTMLElement>(".tok");
    if (c) moveTo(Number(c.dataset.pos), e.shiftKey);
  });
  el.markBad.addEventListener("click", () => mark(-1));
  el.markGood.addEventListener("click", () => mark(1));
  el.markClear.addEventListener("click", () => mark(0));
  el.weight.addEventListener("input", () => setWeight(Number(el.weight.value)));
  el.useReplacement.addEventListener("click", useReplacementText);
  el.replacement.addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault();
      useReplacementText();
    } else if (e.key === "Escape") {
      el.tokens.focus();
    }
  });
  el.submit.addEventListener("click", () => void submit());
  el.sendUnsent.addEventListener("click", () => void flush());
  el.train.addEventListener("click", () => void train());
  el.helpToggle.addEventListener("click", () => {
    el.help.hidden = !el.help.hidden;
    el.helpToggle.setAttribute("aria-expanded", String(!el.help.hidden));
  });
  document.addEventListener("keydown", (e) => {
    const typing = e.target instanceof HTMLInputElement || e.target instanceof HTMLTextAreaElement;
    if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "/") {
      e.preventDefault();
      el.prompt.focus();
    } else if (e.key === "?") {
      el.helpToggle.click();
    } else if (e.key === "n") {
      nextPrompt();
    }
  });
}

async function loadPrompts(): Promise<void> {
  const res = await fetch("prompts.txt").catch(() => null);
  if (res?.ok) prompts = (await res.text()).split("\n").map((l) => l.trim()).filter(Boolean);
  if (prompts.length) settings.promptIndex %= prompts.length;
  renderPromptList();
}

function main(): void {
  bindSettings();
  wire();
  if (work) {
    el.prompt.value ||= work.promptText;
    if (!work.done) work.finish = "interrupted by a reload";
    work.done = true;
    suggested = settings.suggest ? suggestions(work.tokens) : new Map();
    drawTokens();
  }
  changed();
  renderOutbox();
  void loadPrompts();
  void poll();
  setInterval(() => void poll(), 3000);
  document.body.dataset.ready = "true";
}

main();
