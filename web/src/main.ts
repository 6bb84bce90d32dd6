// The labeling page: generate (or score) a completion, watch its tokens stream in as chips, mark
// tokens and spans good or bad with replacements, submit to the trainer, watch the trainer.
// This file wires the page together; the modules it imports each do one job:
//   state.ts     the settings, the outbox, the completion being labelled, the cursor
//   view.ts      drawing the chips, the line above them and the selection panel
//   labelling.ts marking bad/good, replacements, the weight
//   keys.ts      moving the cursor, selecting spans, the keys of the token strip
//   generate.ts  Generate and Score
//   submit.ts    the outbox and SubmitAnnotations
//   panel.ts     the trainer side panel and Train
// tokens.ts decides what things mean (free of the DOM); store.ts keeps them in localStorage.

import { setBearer } from "./api";
import { $, el } from "./dom";
import { generate, nextPrompt, renderPromptList, score } from "./generate";
import { moveTo, onTokenKey, takeMouseSelection } from "./keys";
import { chooseAlternative, mark, setWeight, useReplacementText } from "./labelling";
import { poll, train } from "./panel";
import { saveSettings } from "./store";
import { settings, ui } from "./state";
import { flush, renderOutbox, submit } from "./submit";
import { suggestions } from "./tokens";
import { changed, drawLegend, drawTokens } from "./view";

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
    ui.suggested = settings.suggest && ui.work ? suggestions(ui.work.tokens) : new Map();
    changed();
  });
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
  el.stop.addEventListener("click", () => ui.generating?.abort());
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
  el.alts.addEventListener("click", (e) => {
    const li = (e.target as Element).closest<HTMLElement>("li[data-index]");
    if (li) chooseAlternative(Number(li.dataset.index));
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
  if (res?.ok) ui.prompts = (await res.text()).split("\n").map((l) => l.trim()).filter(Boolean);
  if (ui.prompts.length) settings.promptIndex %= ui.prompts.length;
  renderPromptList();
}

function main(): void {
  drawLegend();
  bindSettings();
  wire();
  if (ui.work) {
    el.prompt.value ||= ui.work.promptText;
    if (!ui.work.done) ui.work.finish = "interrupted by a reload";
    ui.work.done = true;
    ui.suggested = settings.suggest ? suggestions(ui.work.tokens) : new Map();
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
