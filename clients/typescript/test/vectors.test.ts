// The cross-language annotation vectors (tests/vectors/annotations.json, format in README.md
// there), submitted through TrainerClient to a real trainer on the demo model: every acceptance,
// rejection and stored row must be as the vectors say, as for the Python and Go clients.
// The harness sets TOKENFEEDBACK_VECTORS to the file when the servers run the demo model.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { after, before, describe, test } from "node:test";
import {
  AnnotationStateSchema,
  InvalidArgumentError,
  NotFoundError,
  PolicyClient,
  SubmitAnnotationsRequestSchema,
  SubmitStatusSchema,
  TokenfeedbackError,
  TrainerClient,
  fromJson,
  type StoredAnnotation,
} from "../src/index.js";
import type { JsonValue } from "@bufbuild/protobuf";
import { POLICY, TRAINER } from "./env.js";

const WEIGHT_TOLERANCE = 1e-9;

interface Row { position: number; tokenId: number; weight: number; replacement: boolean }
interface Step {
  request: { sequences: { annotationId?: string }[]; partialOk?: boolean };
  expect: {
    results?: { annotationId: string; status: string; rows?: number; reasonContains?: string[] }[];
    error?: { code: string; messageContains: string[] };
  };
}
interface Case {
  name: string;
  steps: Step[];
  stored: {
    annotationId: string; state: string; promptTokenIds: number[]; completionTokenIds: number[]; modelVersion: number;
    rows: Row[]; sequenceReward: number | null; annotatorId: string; metadata: Record<string, string>;
  }[];
  absent: string[];
}
interface Vectors {
  format: string;
  model: { vocabSize: number; probe: { text: string; tokenIds: number[] } };
  cases: Case[];
}

const FILE = process.env.TOKENFEEDBACK_VECTORS ?? "";
const SKIP = !FILE ? "TOKENFEEDBACK_VECTORS not set (the harness sets it with servers on the demo model)" : !POLICY || !TRAINER ? "no servers" : false;
const VECTORS: Vectors | null = FILE ? JSON.parse(readFileSync(FILE, "utf8")) : null;

const statusName = (n: number) => SubmitStatusSchema.values.find((v) => v.number === n)?.name ?? String(n);
const stateName = (n: number) => AnnotationStateSchema.values.find((v) => v.number === n)?.name ?? String(n);
const byKey = (a: Row, b: Row) =>
  a.position - b.position || Number(a.replacement) - Number(b.replacement) || a.tokenId - b.tokenId;

describe("annotation vectors", { skip: SKIP }, () => {
  let policy: PolicyClient;
  let trainer: TrainerClient;
  // The run's prefix on every non-empty annotation id, so runs never collide in one store.
  const prefix = `ts-${new Date().toISOString().replace(/\D/g, "").slice(0, 14)}-${randomBytes(4).toString("hex")}-`;

  before(async () => {
    assert.equal(VECTORS!.format, "tokenfeedback-annotation-vectors/1");
    policy = new PolicyClient(POLICY);
    trainer = new TrainerClient(TRAINER);
    const probe = VECTORS!.model.probe;
    const ids = (await policy.tokenize({ text: probe.text })).tokens.map((t) => t.tokenId);
    const vocab = (await policy.getModelInfo()).vocabSize;
    assert.ok(
      JSON.stringify(ids) === JSON.stringify(probe.tokenIds) && vocab === VECTORS!.model.vocabSize,
      `the vectors were generated for another tokenizer (probe ids ${ids} vs ${probe.tokenIds}, vocab ${vocab} vs ` +
        `${VECTORS!.model.vocabSize}): rebuild them with tests/vectors/generate.py`,
    );
  });
  after(() => {
    policy?.close();
    trainer?.close();
  });

  for (const vector of VECTORS?.cases ?? []) {
    test(vector.name, async () => {
      for (const [number, step] of vector.steps.entries()) {
        const where = `${vector.name} step ${number}`;
        const json = structuredClone(step.request);
        for (const sequence of json.sequences) {
          if (sequence.annotationId) sequence.annotationId = prefix + sequence.annotationId;
        }
        const request = fromJson(SubmitAnnotationsRequestSchema, json as unknown as JsonValue);
        const call = trainer.submitAnnotations(request.sequences, { partialOk: request.partialOk });
        if (step.expect.error) {
          const wanted = step.expect.error;
          await assert.rejects(call, (e: unknown) => {
            assert.ok(e instanceof TokenfeedbackError, `${where}: ${e}`);
            assert.equal(e.codeName, wanted.code, `${where}: ${e.message}`);
            for (const text of wanted.messageContains) {
              assert.ok(e.details.includes(text), `${where}: ${JSON.stringify(text)} not in ${JSON.stringify(e.details)}`);
            }
            return true;
          });
          continue;
        }
        const { results } = await call;
        const wanted = step.expect.results!;
        assert.equal(results.length, wanted.length, where);
        results.forEach((result, i) => {
          assert.equal(result.annotationId, prefix + wanted[i].annotationId, where);
          assert.equal(statusName(result.status), wanted[i].status, `${where}: ${result.annotationId} (${result.reason})`);
          if (wanted[i].rows !== undefined) assert.equal(result.rows, wanted[i].rows, `${where}: ${result.annotationId} rows`);
          for (const text of wanted[i].reasonContains ?? []) {
            assert.ok(result.reason.includes(text), `${where}: ${JSON.stringify(text)} not in ${JSON.stringify(result.reason)}`);
          }
        });
      }
      for (const wanted of vector.stored) {
        const where = `${vector.name}: stored ${wanted.annotationId}`;
        const stored: StoredAnnotation = await trainer.getAnnotation(prefix + wanted.annotationId);
        assert.equal(stateName(stored.state), wanted.state, where);
        assert.deepEqual(stored.promptTokenIds, wanted.promptTokenIds, where);
        assert.deepEqual(stored.completionTokenIds, wanted.completionTokenIds, where);
        assert.equal(stored.modelVersion, BigInt(wanted.modelVersion), where);
        const got = stored.rows.map((r) => ({ position: r.position, tokenId: r.tokenId, weight: r.weight, replacement: r.replacement })).sort(byKey);
        const want = [...wanted.rows].sort(byKey);
        const shape = (rows: Row[]) => rows.map((r) => [r.position, r.tokenId, r.replacement]);
        assert.deepEqual(shape(got), shape(want), `${where}: rows ${JSON.stringify(got)}`);
        got.forEach((row, i) =>
          assert.ok(Math.abs(row.weight - want[i].weight) <= WEIGHT_TOLERANCE, `${where}: row weights ${JSON.stringify(got)} vs ${JSON.stringify(want)}`),
        );
        assert.equal(stored.sequenceReward ?? null, wanted.sequenceReward, where);
        assert.equal(stored.annotatorId, wanted.annotatorId, where);
        assert.deepEqual({ ...stored.metadata }, wanted.metadata, where);
      }
      for (const annotationId of vector.absent) {
        // not stored: NOT_FOUND, or INVALID_ARGUMENT for an id no annotation can have (too long)
        const tooLong = (prefix + annotationId).length > 200;
        await assert.rejects(
          trainer.getAnnotation(prefix + annotationId),
          (err: unknown) =>
            err instanceof NotFoundError ||
            (tooLong && err instanceof InvalidArgumentError && err.field === "annotation_id"),
          `${vector.name}: ${annotationId} is stored`,
        );
      }
    });
  }

  test("the trainer still serves after the vectors", async () => {
    const status = await trainer.getStatus();
    const stored = VECTORS!.cases.reduce((n, c) => n + c.stored.length, 0);
    assert.ok(status.annotationsTotal >= BigInt(stored) && !status.training);
  });
});
