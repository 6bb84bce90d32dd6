// TrainerClient against a real trainer (publishing to the real policy server): submit and read
// back, duplicates, typed errors for bad annotations (nothing stored), partial_ok, withdraw,
// training with progress, status.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  AnnotationState,
  Code,
  InvalidArgumentError,
  NotFoundError,
  PolicyClient,
  SubmitStatus,
  TrainerClient,
  type AnnotatedSequenceInit,
  type Completion,
  type TrainProgress,
} from "../src/index.js";
import { NEEDS_SERVERS, POLICY, RUN, TRAINER } from "./env.js";

describe("TrainerClient", { skip: NEEDS_SERVERS }, () => {
  let policy: PolicyClient;
  let trainer: TrainerClient;
  let sample: Completion;
  let n = 0;
  const id = (what: string) => `${RUN}-${what}-${n++}`;

  /** An annotated copy of `sample`: the first token bad with a replacement, the last one good. */
  const annotated = (annotationId: string, extra: Record<string, unknown> = {}): AnnotatedSequenceInit => ({
    annotationId,
    promptTokenIds: sample.start.promptTokenIds,
    completionTokenIds: sample.tokens.map((t) => t.tokenId),
    modelVersion: sample.start.modelVersion,
    behaviorLogprobs: sample.tokens.map((t) => t.samplingLogprob),
    tokenLabels: [
      { position: 0, weight: -1, replacementTokenId: (sample.tokens[0].tokenId + 1) % 50 },
      { position: sample.tokens.length - 1, weight: 0.5 },
    ],
    annotatorId: "clients/typescript tests",
    metadata: { suite: "typescript", "ключ": "значение" },
    ...extra,
  }) as AnnotatedSequenceInit;

  before(async () => {
    policy = new PolicyClient(POLICY);
    trainer = new TrainerClient(TRAINER);
    sample = await policy.complete({ promptText: "Ottawa is the capital of", params: { maxNewTokens: 6, seed: 5n, stopOnEos: false } });
    assert.equal(sample.tokens.length, 6);
  });
  after(() => {
    policy.close();
    trainer.close();
  });

  test("a submitted annotation is stored as the rows it says; a resend is DUPLICATE", async () => {
    const annotationId = id("submit");
    const first = await trainer.submitAnnotations([annotated(annotationId)]);
    assert.equal(first.results.length, 1);
    assert.equal(first.results[0].annotationId, annotationId);
    assert.equal(first.results[0].status, SubmitStatus.ACCEPTED);
    assert.equal(first.results[0].rows, 3); // two token rows + one replacement row
    const again = await trainer.submitAnnotations([annotated(annotationId)]);
    assert.equal(again.results[0].status, SubmitStatus.DUPLICATE);

    const stored = await trainer.getAnnotation(annotationId);
    assert.equal(stored.annotationId, annotationId);
    assert.ok([AnnotationState.PENDING, AnnotationState.CONSUMED].includes(stored.state));
    assert.deepEqual(stored.promptTokenIds, sample.start.promptTokenIds);
    assert.deepEqual(stored.completionTokenIds, sample.tokens.map((t) => t.tokenId));
    assert.equal(stored.modelVersion, sample.start.modelVersion);
    assert.deepEqual(stored.metadata, { suite: "typescript", "ключ": "значение" });
    assert.equal(stored.annotatorId, "clients/typescript tests");
    const rows = stored.rows
      .map((r) => [r.position, r.tokenId, r.weight, r.replacement] as const)
      .sort((a, b) => a[0] - b[0] || Number(a[3]) - Number(b[3]));
    const last = sample.tokens.length - 1;
    assert.deepEqual(rows, [
      [0, sample.tokens[0].tokenId, -1, false],
      [0, (sample.tokens[0].tokenId + 1) % 50, 1, true],
      [last, sample.tokens[last].tokenId, 0.5, false],
    ]);
  });

  test("a span label becomes rows on the tokens it covers", async () => {
    const annotationId = id("span");
    const token = sample.tokens.find((t) => t.text.trim() !== "");
    assert.ok(token, `no token with visible text in ${JSON.stringify(sample.end.completionText)}`);
    const reply = await trainer.submitAnnotations([
      annotated(annotationId, { tokenLabels: [], spanLabels: [{ start: token.charStart, end: token.charEnd, weight: 1 }] }),
    ]);
    assert.equal(reply.results[0].status, SubmitStatus.ACCEPTED, reply.results[0].reason);
    const stored = await trainer.getAnnotation(annotationId);
    assert.deepEqual(
      stored.rows.map((r) => [r.position, r.tokenId, r.weight, r.replacement]),
      [[token.position, token.tokenId, 1, false]],
    );
  });

  test("an invalid annotation fails the call with InvalidArgumentError naming the field; nothing is stored", async () => {
    const good = id("good");
    const bad = id("bad");
    await assert.rejects(
      trainer.submitAnnotations([annotated(good), annotated(bad, { tokenLabels: [{ position: 0, weight: Number.NaN }] })]),
      (e: unknown) => {
        assert.ok(e instanceof InvalidArgumentError, String(e));
        assert.equal(e.code, Code.INVALID_ARGUMENT);
        assert.equal(e.field, "sequences[1].token_labels[0].weight");
        return true;
      },
    );
    for (const annotationId of [good, bad]) {
      await assert.rejects(trainer.getAnnotation(annotationId), NotFoundError);
    }
  });

  test("with partialOk the valid sequences are stored and the invalid ones REJECTED", async () => {
    const good = id("partial-good");
    const bad = id("partial-bad");
    const reply = await trainer.submitAnnotations(
      [annotated(good), annotated(bad, { tokenLabels: [{ position: 99, weight: 1 }] })],
      { partialOk: true },
    );
    assert.deepEqual(reply.results.map((r) => r.status), [SubmitStatus.ACCEPTED, SubmitStatus.REJECTED]);
    assert.match(reply.results[1].reason, /position/);
    await trainer.getAnnotation(good);
    await assert.rejects(trainer.getAnnotation(bad), NotFoundError);
  });

  test("withdrawing marks an annotation WITHDRAWN and reports unknown ids", async () => {
    const annotationId = id("withdraw");
    await trainer.submitAnnotations([annotated(annotationId)]);
    const unknown = id("never-stored");
    const reply = await trainer.withdrawAnnotations([annotationId, unknown]);
    assert.equal(reply.withdrawn, 1);
    assert.deepEqual(reply.unknownIds, [unknown]);
    assert.equal((await trainer.getAnnotation(annotationId)).state, AnnotationState.WITHDRAWN);
  });

  test("Train streams one progress message per step, then done; status and policy version follow", async () => {
    await trainer.submitAnnotations([annotated(id("train"))]);
    const before = await trainer.getStatus();
    const progress: TrainProgress[] = [];
    for await (const message of trainer.train({ steps: 2 })) progress.push(message);
    const steps = progress.filter((p) => !p.done);
    assert.equal(steps.length, 2);
    steps.forEach((p, i) => {
      assert.equal(p.totalSteps, 2);
      assert.ok(Number.isFinite(p.loss) && Number.isFinite(p.kl), `step ${i}: loss ${p.loss} kl ${p.kl}`);
      assert.ok(p.rows > 0);
    });
    const done = progress.at(-1)!;
    assert.ok(done.done);
    const status = await trainer.getStatus();
    assert.equal(status.step, before.step + 2n);
    assert.ok(status.modelVersion > before.modelVersion);
    assert.equal(done.publishedVersion, status.modelVersion);
    const info = await policy.getModelInfo();
    assert.equal(info.modelVersion, status.modelVersion);
  });

  test("an unknown annotation id is NotFoundError", async () => {
    await assert.rejects(trainer.getAnnotation(id("missing")), (e: unknown) => e instanceof NotFoundError && e.code === Code.NOT_FOUND);
  });
});
