// What the page computes from the token stream, free of the DOM: the completion's tokens and the
// labels put on them, how a token is drawn, which tokens to suggest, and the AnnotatedSequence a
// labelled completion becomes. view.ts draws; this file decides.

import { create, type MessageInitShape } from "@bufbuild/protobuf";
import {
  AnnotatedSequenceSchema,
  type AnnotatedSequence,
  type SpanLabelSchema,
  type TokenLabelSchema,
} from "../gen/tokenfeedback/v1/trainer_pb";

/** One completion token as streamed (TokenEvent) or scored (ScoredToken). Plain data so that it
 * survives JSON in localStorage. */
export interface Tok {
  position: number;
  tokenId: number;
  /** The characters this token adds; "" for a token that only carries part of a multi-byte
   * character another token completes. */
  text: string;
  /** Code-point offsets into the completion text, half-open. */
  charStart: number;
  charEnd: number;
  logprob: number;
  /** Behavior logprob (TokenEvent.sampling_logprob); null for a scored completion. */
  samplingLogprob: number | null;
  rank: number;
  alternatives: Alt[];
  modelVersion: number;
}

export interface Alt {
  tokenId: number;
  text: string;
  logprob: number;
}

/** A judgement of one token: weight (+ good, - bad) and, for a bad one, what should have come
 * instead: a token from the alternatives, or typed text (tokenized in context by the trainer). */
export interface Label {
  weight: number;
  replacementTokenId?: number;
  replacementText?: string;
}

/** A judgement of a run of characters (code points, half-open), as selected with the mouse or with
 * Shift+arrows. */
export interface Span {
  start: number;
  end: number;
  weight: number;
  text: string;
  replacementText?: string;
}

/** A completion being labelled: everything needed to draw it again after a reload and to turn it
 * into an AnnotatedSequence. */
export interface Work {
  /** The idempotency key it is submitted under; a resend after a failure reuses it. */
  annotationId: string;
  source: "generate" | "score";
  generationId: string;
  promptText: string;
  promptTokenIds: number[];
  modelVersion: number;
  tokens: Tok[];
  done: boolean;
  finish: string;
  labels: Record<number, Label>;
  spans: Span[];
  /** Set once the trainer acknowledged it ("accepted" or "duplicate"); labels are then frozen. */
  submitted?: string;
}

export function newWork(source: Work["source"], promptText: string): Work {
  return {
    annotationId: crypto.randomUUID(),
    source,
    generationId: "",
    promptText,
    promptTokenIds: [],
    modelVersion: 0,
    tokens: [],
    done: false,
    finish: "",
    labels: {},
    spans: [],
  };
}

// ---- drawing ---------------------------------------------------------------------------------

/** Whitespace made visible one UTF-16 unit for one, so that a DOM selection offset inside a chip is
 * still an offset into the token's own text. */
export const VISIBLE: Record<string, string> = { " ": "·", "\n": "↵", "\t": "→", "\r": "␍" };

/** Splits a token's text into runs of plain text and of visible-whitespace markers. */
export function pieces(text: string): { text: string; ws: boolean }[] {
  const out: { text: string; ws: boolean }[] = [];
  for (const ch of text) {
    const ws = ch in VISIBLE;
    const shown = ws ? VISIBLE[ch] : ch;
    const last = out[out.length - 1];
    if (last && last.ws === ws) last.text += shown;
    else out.push({ text: shown, ws });
  }
  return out;
}

/** The probability bands a chip is shaded by, most likely first: the bands of the CLI's colours
 * (`tokenfeedback generate --color`). The page draws them as a legend under the tokens. */
export const BANDS: readonly { min: number; label: string }[] = [
  { min: 0.5, label: "p ≥ 50%" },
  { min: 0.1, label: "10–50%" },
  { min: 0.01, label: "1–10%" },
  { min: 0, label: "< 1%" },
];

/** The index in BANDS of a token's probability. */
export function band(logprob: number): number {
  const p = Math.exp(logprob);
  const i = BANDS.findIndex((b) => p >= b.min);
  return i < 0 ? BANDS.length - 1 : i;
}

/** Where the cursor starts on a finished completion: its least likely token that adds characters
 * (the policy's own best guess at a mistake, often the word a fact hinges on); the earliest of
 * equally unlikely ones; 0 when no token adds characters. The page's help says so. */
export function startPosition(tokens: Tok[]): number {
  let best: Tok | null = null;
  for (const t of tokens) if (t.text !== "" && (best === null || t.logprob < best.logprob)) best = t;
  return best?.position ?? 0;
}

/** What a chip that adds no characters is called: "eos" for the last token of a completion that
 * ended on the end-of-sequence token (its finish reason says so, whatever other roles the id has,
 * e.g. pad or unk sharing it), else the special token's role, else nothing (part of a character). */
export function specialName(w: Work, t: Tok, special: ReadonlyMap<number, string>): string | undefined {
  if (t.text !== "") return undefined;
  if (w.finish === "eos" && t.position === w.tokens.length - 1) return "eos";
  return special.get(t.tokenId);
}

export function percent(logprob: number): string {
  const p = Math.exp(logprob) * 100;
  return p >= 10 ? `${p.toFixed(0)}%` : p >= 1 ? `${p.toFixed(1)}%` : `${p.toPrecision(1)}%`;
}

/** The tooltip of a chip: logprob, probability, rank and model version. */
export function tooltip(t: Tok): string {
  return `logprob ${t.logprob.toFixed(3)} (p ${percent(t.logprob)}) · rank ${t.rank} · v${t.modelVersion} · id ${t.tokenId}`;
}

/** Length in code points (the unit of every offset in tokenfeedback.v1). */
export function cpLength(s: string): number {
  let n = 0;
  for (const _ of s) n++;
  return n;
}

export function completionText(w: Work): string {
  return w.tokens.map((t) => t.text).join("");
}

/** The code points [start, end) of a text. */
export function cpSlice(text: string, start: number, end: number): string {
  return Array.from(text).slice(start, end).join("");
}

/** Positions of the tokens a character span covers, by the servers' rule (docs/design.md, "Spans";
 * common/spans.py): a token overlaps the span ignoring its leading whitespace, and a token that
 * only starts a character (no characters of its own) belongs where that character starts. What
 * the page highlights is what the trainer will store. */
export function tokensInSpan(tokens: Tok[], start: number, end: number): number[] {
  return tokens
    .filter((t) => {
      if (t.charStart === t.charEnd) return start <= t.charStart && t.charStart < end;
      const lead = cpLength(t.text) - cpLength(t.text.trimStart());
      const tokenStart = lead < cpLength(t.text) ? t.charStart + lead : t.charStart;
      return tokenStart < end && start < t.charEnd;
    })
    .map((t) => t.position);
}

// ---- suggestions -----------------------------------------------------------------------------

/** Close call: an alternative within this factor of the sampled token's probability. */
const CLOSE_RATIO = Math.log(1.5);

/** Tokens an annotator should check first, with why: the least likely ones under the policy
 * itself (at most 3, about one in ten, and only below p = 0.5), and the two closest calls, where
 * another top-k alternative was within a factor 1.5 of the sampled token's probability. */
export function suggestions(tokens: Tok[]): Map<number, string> {
  const out = new Map<number, string>();
  const count = Math.min(3, Math.max(1, Math.ceil(tokens.length / 10)));
  const least = [...tokens].sort((a, b) => a.logprob - b.logprob).slice(0, count);
  for (const t of least) if (t.logprob < Math.log(0.5)) out.set(t.position, `unlikely: p ${percent(t.logprob)}`);
  const close = tokens
    .filter((t) => !out.has(t.position) && t.logprob < Math.log(0.9))
    .map((t) => {
      const rival = t.alternatives.find((a) => a.tokenId !== t.tokenId);
      return { t, rival, gap: rival ? Math.abs(rival.logprob - t.logprob) : Infinity };
    })
    .filter((c) => c.gap < CLOSE_RATIO)
    .sort((a, b) => a.gap - b.gap)
    .slice(0, 2);
  for (const { t, rival } of close) {
    out.set(t.position, `close call: ${JSON.stringify(rival!.text)} ${percent(rival!.logprob)} vs ${percent(t.logprob)}`);
  }
  return out;
}

// ---- the annotation --------------------------------------------------------------------------

/** The AnnotatedSequence for a labelled completion: the sampled ids are the truth; a token label
 * with a typed replacement becomes a span label over that token's characters, so the trainer
 * tokenizes the text in context (docs/design.md, "Spans"). */
export function toSequence(w: Work, annotatorId: string): AnnotatedSequence {
  const text = completionText(w);
  const tokenLabels: MessageInitShape<typeof TokenLabelSchema>[] = [];
  const spanLabels: MessageInitShape<typeof SpanLabelSchema>[] = [];
  for (const t of w.tokens) {
    const label = w.labels[t.position];
    if (!label) continue;
    if (label.replacementText !== undefined) {
      spanLabels.push({
        start: t.charStart,
        end: t.charEnd,
        weight: label.weight,
        replacementText: label.replacementText,
        text: cpSlice(text, t.charStart, t.charEnd),
      });
    } else {
      tokenLabels.push({ position: t.position, weight: label.weight, replacementTokenId: label.replacementTokenId });
    }
  }
  for (const s of w.spans) {
    spanLabels.push({ start: s.start, end: s.end, weight: s.weight, replacementText: s.replacementText, text: s.text });
  }
  const behavior = w.tokens.map((t) => t.samplingLogprob);
  return create(AnnotatedSequenceSchema, {
    annotationId: w.annotationId,
    promptTokenIds: w.promptTokenIds,
    completionTokenIds: w.tokens.map((t) => t.tokenId),
    modelVersion: BigInt(w.modelVersion),
    behaviorLogprobs: behavior.every((b) => b !== null) ? behavior.map((b) => Math.min(0, b as number)) : [],
    tokenLabels,
    spanLabels,
    annotatorId,
    metadata: { source: "web", generation_id: w.generationId, kind: w.source },
  });
}

export function labelCount(w: Work): number {
  return Object.keys(w.labels).length + w.spans.length;
}
