// What the page keeps in the browser's localStorage, so a reload loses nothing: the completion being
// labelled, the outbox of annotations not yet acknowledged by the trainer, and the annotator's
// settings. An annotation leaves the outbox only when the trainer answered ACCEPTED or DUPLICATE
// for its id.

import { fromJson, toJson, type JsonValue } from "@bufbuild/protobuf";
import { AnnotatedSequenceSchema, type AnnotatedSequence } from "../gen/tokenfeedback/v1/trainer_pb";
import type { Work } from "./tokens";

const KEY = { work: "tokenfeedback.work", outbox: "tokenfeedback.outbox", settings: "tokenfeedback.settings" };

function load<T>(key: string, fallback: T): T {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : (JSON.parse(raw) as T);
  } catch {
    return fallback;
  }
}

function save(key: string, value: unknown): void {
  if (value === null) localStorage.removeItem(key);
  else localStorage.setItem(key, JSON.stringify(value));
}

export const loadWork = (): Work | null => load<Work | null>(KEY.work, null);
export const saveWork = (w: Work | null): void => save(KEY.work, w);

export interface Settings {
  annotator: string;
  bearer: string;
  maxTokens: number;
  temperature: number;
  alternatives: number;
  seed: string;
  suggest: boolean;
  promptIndex: number;
  weight: number;
}

const DEFAULTS: Settings = {
  annotator: "",
  bearer: "",
  maxTokens: 32,
  temperature: 1,
  alternatives: 8,
  seed: "",
  suggest: true,
  promptIndex: 0,
  weight: 1,
};

export const loadSettings = (): Settings => ({ ...DEFAULTS, ...load<Partial<Settings>>(KEY.settings, {}) });
export const saveSettings = (s: Settings): void => save(KEY.settings, s);

/** An annotation not yet acknowledged: "unsent" ones go out with the next submit; "rejected" ones
 * were refused with a reason and wait for the annotator to fix or discard them. */
export interface OutboxEntry {
  id: string;
  sequence: JsonValue;
  state: "unsent" | "rejected";
  note: string;
  at: number;
}

export class Outbox {
  private entries: OutboxEntry[] = load<OutboxEntry[]>(KEY.outbox, []);

  all(): readonly OutboxEntry[] {
    return this.entries;
  }

  unsent(): OutboxEntry[] {
    return this.entries.filter((e) => e.state === "unsent");
  }

  /** Adds or replaces (same annotation id) an annotation, as unsent. */
  put(seq: AnnotatedSequence): void {
    const entry: OutboxEntry = {
      id: seq.annotationId,
      sequence: toJson(AnnotatedSequenceSchema, seq),
      state: "unsent",
      note: "",
      at: Date.now(),
    };
    const i = this.entries.findIndex((e) => e.id === entry.id);
    if (i >= 0) this.entries[i] = entry;
    else this.entries.push(entry);
    this.persist();
  }

  sequence(e: OutboxEntry): AnnotatedSequence {
    return fromJson(AnnotatedSequenceSchema, e.sequence);
  }

  mark(id: string, state: OutboxEntry["state"], note: string): void {
    for (const e of this.entries) if (e.id === id) Object.assign(e, { state, note });
    this.persist();
  }

  remove(id: string): void {
    this.entries = this.entries.filter((e) => e.id !== id);
    this.persist();
  }

  private persist(): void {
    save(KEY.outbox, this.entries);
  }
}
