// The trainer side panel: the trainer's status and the policy's model info, polled every few
// seconds, and the Train button with its progress log.

import type { ModelInfo } from "../gen/tokenfeedback/v1/policy_pb";
import type { TrainerStatus } from "../gen/tokenfeedback/v1/trainer_pb";
import { describe, policy, trainer } from "./api";
import { el } from "./dom";
import { ui } from "./state";
import { decorateAll, renderMeta } from "./view";

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
    ui.policyVersion = Number(mi.value.modelVersion);
    // One id can have several roles (bos, eos, unk on one token): eos names it, else the first.
    ui.special = new Map();
    for (const t of mi.value.specialTokens) if (!ui.special.has(t.tokenId) || t.role === "eos") ui.special.set(t.tokenId, t.role);
    el.modelInfo.textContent = `${mi.value.modelName} · policy v${ui.policyVersion} · ${mi.value.device}`;
  } else {
    el.modelInfo.textContent = `policy: ${describe(mi.reason)}`;
  }
  if (st.status === "rejected") {
    dl([["trainer", describe(st.reason)]]);
    el.status.dataset.reachable = "false";
    return;
  }
  const s = st.value;
  // TrainerStatus has no "no loss yet": a trainer that has not trained since it started reports
  // zeros. A real step's loss and token loss are never both exactly 0 (its KL may be, at step 1).
  const trained = s.lastLoss !== 0 || s.lastTokenLoss !== 0;
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
    ["last loss", trained ? num(s.lastLoss) : "—"],
    ["token loss", trained ? num(s.lastTokenLoss) : "—"],
    ["KL", trained ? num(s.lastKl, 5) : "—"],
    ["loss", `${s.variant}, beta ${s.beta}, horizon ${s.horizon}, gamma ${s.gamma}`],
    ["training", s.training ? "yes" : "no"],
    ...s.policies.map((p): [string, string] => [p.address, p.reachable ? `v${p.modelVersion}` : `unreachable ${p.lastError}`]),
  ]);
}

let polling: Promise<void> | null = null;

/** GetStatus and GetModelInfo, every few seconds and after every submit or training run. */
export function poll(): Promise<void> {
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

export async function train(): Promise<void> {
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

