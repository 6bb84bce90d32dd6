// The page's elements, looked up once by id: a missing one fails at load, not at first use.

export const $ = <T extends HTMLElement = HTMLElement>(id: string): T => {
  const found = document.getElementById(id);
  if (!found) throw new Error(`index.html has no #${id}`);
  return found as T;
};

export const el = {
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
  legend: $("legend"),
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

