// PolicyClient against a real policy server (address from the harness): streaming, scoring,
// tokenizing, typed errors for bad input, deadlines and cancellation.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  CancelledError,
  Code,
  DeadlineExceededError,
  FinishReason,
  InvalidArgumentError,
  PolicyClient,
  TokenfeedbackError,
  UnavailableError,
  type GenerateEvent,
  type GenerateRequestInit,
  type GenerationEnd,
  type GenerationStart,
  type ModelInfo,
  type TokenEvent,
} from "../src/index.js";
import { NEEDS_SERVERS, POLICY } from "./env.js";

const codePoints = (s: string) => [...s].length;

describe("PolicyClient", { skip: NEEDS_SERVERS }, () => {
  let policy: PolicyClient;
  let info: ModelInfo;

  before(async () => {
    policy = new PolicyClient(POLICY);
    info = await policy.getModelInfo();
  });
  after(() => policy.close());

  test("GetModelInfo describes the model", () => {
    assert.ok(info.vocabSize > 0, `vocabSize ${info.vocabSize}`);
    assert.ok(info.maxNewTokens > 0 && info.maxLength > 0);
    assert.ok(info.modelVersion >= 0n);
    assert.ok(info.modelName.length > 0);
  });

  for (const numAlternatives of [0, 3]) {
    test(`Generate streams start, tokens and end consistently (${numAlternatives} alternatives)`, async () => {
      const events: GenerateEvent["event"][] = [];
      for await (const { event } of policy.generate({
        promptText: "Paris is the capital of",
        params: { maxNewTokens: 10, seed: 3n, numAlternatives, stopOnEos: false },
      })) {
        events.push(event);
      }
      assert.equal(events[0].case, "start");
      assert.equal(events.at(-1)!.case, "end");
      const start = events[0].value as GenerationStart;
      const end = events.at(-1)!.value as GenerationEnd;
      const tokens = events.slice(1, -1).map((e) => {
        assert.equal(e.case, "token");
        return e.value as TokenEvent;
      });
      assert.equal(tokens.length, 10);
      assert.equal(end.finishReason, FinishReason.LENGTH);
      assert.equal(end.completionTokens, tokens.length);
      assert.equal(end.promptTokens, start.promptTokenIds.length);
      assert.equal(tokens.map((t) => t.text).join(""), end.completionText);
      let offset = 0;
      tokens.forEach((token, i) => {
        assert.equal(token.position, i);
        assert.equal(token.charStart, offset);
        assert.equal(token.charEnd - token.charStart, codePoints(token.text));
        offset = token.charEnd;
        assert.ok(token.logprob <= 0 && token.samplingLogprob <= 0);
        assert.ok(token.tokenId >= 0 && token.tokenId < info.vocabSize);
        assert.ok(token.rank >= 1);
        assert.equal(token.modelVersion, start.modelVersion);
        assert.equal(token.alternatives.length, numAlternatives);
        for (let k = 1; k < token.alternatives.length; k++) {
          assert.ok(token.alternatives[k - 1].logprob >= token.alternatives[k].logprob);
        }
        if (numAlternatives > 0 && token.rank <= numAlternatives) {
          assert.equal(token.alternatives[token.rank - 1].tokenId, token.tokenId);
        }
      });
      assert.equal(offset, codePoints(end.completionText));
      assert.equal(end.modelVersion, start.modelVersion);
    });
  }

  test("the same seed gives the same tokens; Score reproduces their logprobs", async () => {
    const request = { promptText: "Berlin is", params: { maxNewTokens: 8, seed: 11n, stopOnEos: false } };
    const a = await policy.complete(request);
    const b = await policy.complete(request);
    assert.deepEqual(a.tokens.map((t) => t.tokenId), b.tokens.map((t) => t.tokenId));
    const scored = await policy.score({
      promptTokenIds: a.start.promptTokenIds,
      completionTokenIds: a.tokens.map((t) => t.tokenId),
      candidateTokenIds: [a.tokens[0].tokenId],
    });
    assert.equal(scored.tokens.length, a.tokens.length);
    assert.equal(scored.completionText, a.end.completionText);
    if (scored.modelVersion === a.start.modelVersion) {
      scored.tokens.forEach((token, i) => {
        assert.equal(token.tokenId, a.tokens[i].tokenId);
        assert.ok(Math.abs(token.logprob - a.tokens[i].logprob) < 1e-3, `position ${i}: ${token.logprob} vs ${a.tokens[i].logprob}`);
      });
    }
    const total = scored.tokens.reduce((sum, t) => sum + t.logprob, 0);
    assert.ok(Math.abs(total - scored.totalLogprob) < 1e-3);
    assert.equal(scored.tokens[0].candidateLogprobs.length, 1);
    assert.ok(Math.abs(scored.tokens[0].candidateLogprobs[0] - scored.tokens[0].logprob) < 1e-5);
  });

  test("Tokenize round-trips text, unicode included, and ids", async () => {
    const text = "Café au lait costs 3€. 😀 漢字";
    const pieces = await policy.tokenize({ text });
    assert.equal(pieces.text, text);
    assert.equal(pieces.tokens.map((t) => t.text).join(""), text);
    assert.equal(pieces.tokens.at(-1)!.charEnd, codePoints(text));
    const back = await policy.tokenize({ tokenIds: pieces.tokens.map((t) => t.tokenId) });
    assert.equal(back.text, text);
  });

  test("AlignSpans maps a character span to the tokens it overlaps", async () => {
    const text = "Paris is the capital of France.";
    const start = text.indexOf("France");
    const reply = await policy.alignSpans({ text, spans: [{ start, end: start + "France".length, text: "France" }] });
    assert.equal(reply.spans.length, 1);
    const positions = reply.spans[0].tokenPositions;
    assert.ok(positions.length >= 1);
    const covered = positions.map((p) => reply.tokens[p].text).join("");
    assert.ok(covered.includes("France") || "France".includes(covered.trim()), covered);
    assert.equal(reply.spans[0].start, start);
  });

  for (const [name, request, field] of [
    ["top_p above 1", { promptText: "a", params: { topP: 1.5 } }, "params.top_p"],
    ["negative temperature", { promptText: "a", params: { temperature: -1 } }, "params.temperature"],
    ["both prompts", { promptText: "a", promptTokenIds: [1] }, "prompt_text"],
    ["a token id outside the vocabulary", { promptTokenIds: [1 << 30] }, "prompt_token_ids"],
  ] as [string, GenerateRequestInit, string][]) {
    test(`Generate with ${name} is InvalidArgumentError naming ${field}`, async () => {
      await assert.rejects(policy.complete(request), (e: unknown) => {
        assert.ok(e instanceof InvalidArgumentError, String(e));
        assert.equal(e.code, Code.INVALID_ARGUMENT);
        assert.ok(e.field?.startsWith(field), `field ${e.field} in ${e.details}`);
        return true;
      });
    });
  }

  test("the server keeps serving after bad input", async () => {
    await assert.rejects(policy.score({ promptText: "a" }), InvalidArgumentError);
    const ok = await policy.complete({ promptText: "a", params: { maxNewTokens: 2 } });
    assert.ok(ok.tokens.length >= 1);
  });

  test("a deadline ends a long generation with DeadlineExceededError", async () => {
    const started = Date.now();
    await assert.rejects(
      policy.complete(
        { promptText: "a", params: { maxNewTokens: info.maxNewTokens, stopOnEos: false } },
        { timeoutMs: 50 },
      ),
      (e: unknown) => {
        assert.ok(e instanceof DeadlineExceededError, String(e));
        assert.equal(e.codeName, "DEADLINE_EXCEEDED");
        return true;
      },
    );
    assert.ok(Date.now() - started < 10_000);
  });

  test("a unary deadline that cannot be met is DeadlineExceededError", async () => {
    await assert.rejects(policy.getModelInfo({ timeoutMs: 0.001 }), DeadlineExceededError);
  });

  test("leaving the loop early cancels the stream; the server serves the next one", async () => {
    let seen = 0;
    for await (const { event } of policy.generate({ promptText: "a", params: { maxNewTokens: 200, stopOnEos: false } })) {
      if (event.case === "token" && ++seen === 2) break;
    }
    assert.equal(seen, 2);
    const next = await policy.complete({ promptText: "b", params: { maxNewTokens: 3, stopOnEos: false } });
    assert.equal(next.tokens.length, 3);
  });

  test("aborting a stream's signal is CancelledError", async () => {
    const controller = new AbortController();
    await assert.rejects(
      (async () => {
        for await (const { event } of policy.generate(
          { promptText: "a", params: { maxNewTokens: 200, stopOnEos: false } },
          { signal: controller.signal },
        )) {
          if (event.case === "token") controller.abort();
        }
      })(),
      (e: unknown) => e instanceof CancelledError && e.code === Code.CANCELLED,
    );
  });

  test("TLS against the plaintext server is UnavailableError, not a hang", async () => {
    const tls = new PolicyClient(POLICY, { tls: true, retries: 0 });
    await assert.rejects(tls.getModelInfo({ timeoutMs: 10_000 }), (e: unknown) => {
      assert.ok(e instanceof UnavailableError, String(e));
      return true;
    });
    tls.close();
  });

  test("a bearer token travels with the calls (the server here has auth off and accepts them)", async () => {
    const withToken = new PolicyClient(POLICY, { token: "test-token" });
    const reply = await withToken.getModelInfo();
    assert.equal(reply.vocabSize, info.vocabSize);
    for await (const _ of withToken.generate({ promptText: "a", params: { maxNewTokens: 1 } })) {
      // streams carry it too
    }
    withToken.close();
  });

  test("every failure is a TokenfeedbackError", async () => {
    await assert.rejects(policy.alignSpans({ text: "abc", spans: [{ start: 2, end: 1 }] }), TokenfeedbackError);
  });
});
