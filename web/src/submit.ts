// Submitting: a labelled completion goes into the outbox (store.ts) and out to the trainer in one
// SubmitAnnotations call with everything else unsent; the trainer's answers are listed.

import { SubmitStatus } from "../gen/tokenfeedback/v1/trainer_pb";
import { describe, trainer } from "./api";
import { el } from "./dom";
import { poll } from "./panel";
import { saveWork } from "./store";
import { outbox, settings, ui } from "./state";
import { labelCount, toSequence } from "./tokens";
import { note, renderDetail, renderMeta } from "./view";

function addResult(id: string, status: string, text: string): void {
  const li = document.createElement("li");
  li.dataset.status = status;
  li.dataset.annotationId = id;
  li.textContent = `${status}${text ? ` · ${text}` : ""} · ${id.slice(0, 8)}`;
  el.results.prepend(li);
  while (el.results.children.length > 20) el.results.lastElementChild?.remove();
}

export async function submit(): Promise<void> {
  if (!ui.work || !ui.work.done) return note("Nothing finished to submit yet.", true);
  if (ui.work.submitted) return note("This completion was submitted already; generate the next one.", true);
  if (labelCount(ui.work) === 0) return note("Mark at least one token or span first.", true);
  outbox.put(toSequence(ui.work, settings.annotator));
  await flush();
}

/** Sends every unsent annotation in one SubmitAnnotations call (partial_ok, so one bad sequence
 * does not hold back the others). Only ACCEPTED and DUPLICATE take one out of the outbox. */
export async function flush(): Promise<void> {
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
        if (ui.work?.annotationId === r.annotationId) ui.work.submitted = status;
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
  saveWork(ui.work);
  renderOutbox();
  renderMeta();
  renderDetail();
  void poll();
}

export function renderOutbox(): void {
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

