// Generating and scoring: a completion streamed from the policy (Generate) or a given one scored
// (Score) becomes the work being labelled; the prompt list's "next prompt".

import { FinishReason } from "../gen/tokenfeedback/v1/policy_pb";
import type { GenerateEvent, ScoredToken, TokenEvent } from "../gen/tokenfeedback/v1/policy_pb";
import { describe, isAbort, policy } from "./api";
import { el } from "./dom";
import { saveSettings, saveWork } from "./store";
import { settings, ui } from "./state";
import { labelCount, newWork, startPosition, suggestions, type Alt, type Tok, type Work } from "./tokens";
import { appendChip, changed, decorateAll, drawTokens, note, renderDetail, renderMeta } from "./view";

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

/** A new completion replaces the work: the cursor, selection, suggestions and the note about the
 * previous one's submit are dropped. */
function begin(w: Work): void {
  ui.work = w;
  ui.cursor = 0;
  ui.anchor = null;
  ui.mouseSpan = null;
  ui.suggested = new Map();
  saveWork(w);
  note("");
  drawTokens();
  renderMeta();
  renderDetail();
}

/** After the last token: suggestions, the cursor on the least likely token (tokens.startPosition),
 * and the focus on the tokens unless the annotator went elsewhere meanwhile (the side panel, say). */
function finish(w: Work): void {
  w.done = true;
  if (ui.work !== w) return;
  ui.suggested = settings.suggest ? suggestions(w.tokens) : new Map();
  ui.cursor = startPosition(w.tokens);
  changed();
  const at = document.activeElement;
  const idle = !at || at === document.body || el.promptForm.contains(at) || el.tokens.contains(at);
  if (idle && w.tokens.length) el.tokens.focus();
}

function okToReplace(): boolean {
  if (!ui.work || ui.work.submitted || labelCount(ui.work) === 0) return true;
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

export async function generate(): Promise<void> {
  const promptText = el.prompt.value;
  if (promptText.trim() === "") return note("Type a prompt first.", true);
  if (!okToReplace()) return;
  ui.generating?.abort();
  const ctl = new AbortController();
  ui.generating = ctl;
  const w = newWork("generate", promptText);
  begin(w);
  el.stop.hidden = false;
  try {
    const stream = policy.generate({ promptText, params: samplingParams() }, { signal: ctl.signal });
    for await (const ev of stream as AsyncIterable<GenerateEvent>) {
      if (ui.work !== w) break;
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
    if (ui.generating === ctl) ui.generating = null;
    el.stop.hidden = true;
    finish(w);
  }
}

export async function score(): Promise<void> {
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

export function nextPrompt(): void {
  if (!ui.prompts.length) return;
  el.prompt.value = ui.prompts[settings.promptIndex % ui.prompts.length];
  settings.promptIndex = (settings.promptIndex + 1) % ui.prompts.length;
  saveSettings(settings);
  renderPromptList();
  void generate();
}

export function renderPromptList(): void {
  el.nextPrompt.hidden = ui.prompts.length === 0;
  el.promptListInfo.textContent = ui.prompts.length ? `prompt list: next is ${settings.promptIndex + 1} of ${ui.prompts.length}` : "";
}

