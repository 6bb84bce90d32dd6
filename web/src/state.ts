// The page's state: the annotator's settings, the outbox, the completion being labelled and where
// the keyboard and mouse are in it. Modules change it through `ui` and redraw with view.changed().

import { loadSettings, loadWork, Outbox } from "./store";
import { completionText, cpSlice, type Tok, type Work } from "./tokens";

export const settings = loadSettings();
export const outbox = new Outbox();

export const ui = {
  work: loadWork() as Work | null,
  /** The token the keyboard is on; with `anchor` set, Shift+arrows select the tokens between them. */
  cursor: 0,
  anchor: null as number | null,
  /** Characters selected with the mouse (code points into the completion text). */
  mouseSpan: null as { start: number; end: number } | null,
  suggested: new Map<number, string>(),
  /** The policy's current model version (GetModelInfo); -1 until known. */
  policyVersion: -1,
  /** Special tokens by id ("eos", ...), from GetModelInfo: drawn by name, since they add no text. */
  special: new Map<number, string>(),
  generating: null as AbortController | null,
  prompts: [] as string[],
};

/** What the buttons and keys act on: the token under the cursor, or a span. */
export type Target = { kind: "token"; tok: Tok } | { kind: "span"; start: number; end: number; text: string };

export function target(): Target | null {
  if (!ui.work || ui.work.tokens.length === 0) return null;
  const text = completionText(ui.work);
  if (ui.mouseSpan) return { kind: "span", ...ui.mouseSpan, text: cpSlice(text, ui.mouseSpan.start, ui.mouseSpan.end) };
  if (ui.anchor !== null && ui.anchor !== ui.cursor) {
    const [a, b] = [Math.min(ui.anchor, ui.cursor), Math.max(ui.anchor, ui.cursor)];
    const start = ui.work.tokens[a].charStart;
    const end = ui.work.tokens[b].charEnd;
    return { kind: "span", start, end, text: cpSlice(text, start, end) };
  }
  return { kind: "token", tok: ui.work.tokens[ui.cursor] };
}

export const editable = (): boolean => ui.work !== null && !ui.work.submitted;
