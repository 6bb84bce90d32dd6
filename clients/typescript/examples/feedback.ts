// The feedback loop in one script, on a completion the example KNOWS is wrong: score
// "Paris is the capital of" + " Canada." (a false fact), mark the token where it goes wrong
// (" Canada") bad with the right token (" France") as its replacement, submit the annotation,
// train one step, and score again. It never marks a token of the model's own output, whose
// errors it cannot know: an example that guesses (say, "the least likely token is wrong") can
// mark a right answer bad, and its annotation stays in the trainer's store and is replayed by
// later training.
//
//   node dist/examples/feedback.js [POLICY_ADDR] [TRAINER_ADDR]
//
// Addresses default to $TOKENFEEDBACK_POLICY_ADDR / $TOKENFEEDBACK_TRAINER_ADDR, then
// $TOKENFEEDBACK_POLICY / $TOKENFEEDBACK_TRAINER (what `tokenfeedback serve` prints), then
// 127.0.0.1:50051 / 127.0.0.1:50052 (where it binds). With auth and TLS on, set
// $TOKENFEEDBACK_TOKEN (an admin token: Train needs one) and $TOKENFEEDBACK_CA (roots PEM file).

import { randomUUID } from "node:crypto";
import { PolicyClient, TokenfeedbackError, TrainerClient, type ClientOptions } from "../src/index.js";

const PROMPT = "Paris is the capital of";
const WRONG = " Canada."; // the false completion this example corrects
const RIGHT = " France."; // what it should say

async function main(): Promise<void> {
  const env = process.env;
  const [
    policyAddr = env.TOKENFEEDBACK_POLICY_ADDR || env.TOKENFEEDBACK_POLICY || "127.0.0.1:50051",
    trainerAddr = env.TOKENFEEDBACK_TRAINER_ADDR || env.TOKENFEEDBACK_TRAINER || "127.0.0.1:50052",
  ] = process.argv.slice(2);
  const options: ClientOptions = {
    token: process.env.TOKENFEEDBACK_TOKEN || undefined,
    rootCertificates: process.env.TOKENFEEDBACK_CA || undefined,
  };
  const policy = new PolicyClient(policyAddr, options);
  const trainer = new TrainerClient(trainerAddr, options);
  try {
    // 1. Score the wrong completion and the right one (teacher forcing: the model's logprob of
    //    each given token). The first position where their tokens differ is where the wrong one
    //    goes wrong; the right one's token there is the replacement.
    const wrong = await policy.score({ promptText: PROMPT, completionText: WRONG });
    const right = await policy.score({ promptText: PROMPT, completionText: RIGHT });
    const at = wrong.tokens.findIndex((token, i) => token.tokenId !== right.tokens[i]?.tokenId);
    if (at < 0) throw new Error(`${JSON.stringify(WRONG)} and ${JSON.stringify(RIGHT)} tokenize alike`);
    const bad = wrong.tokens[at];
    const replacement = right.tokens[at];
    console.log(`prompt:     ${JSON.stringify(PROMPT)} (model version ${wrong.modelVersion})`);
    console.log(`completion: ${JSON.stringify(wrong.completionText)} (known to be wrong)`);
    console.log(
      `bad token:  #${at} ${JSON.stringify(bad.text)} id ${bad.tokenId} logprob ${bad.logprob.toFixed(3)}; ` +
        `replacement ${JSON.stringify(replacement.text)} id ${replacement.tokenId} logprob ${replacement.logprob.toFixed(3)}`,
    );

    // 2. Submit the annotation: the scored ids are the truth. No behavior logprobs: the
    //    completion was given, not sampled.
    const annotationId = `example-ts-${randomUUID()}`;
    const submitted = await trainer.submitAnnotations([
      {
        annotationId,
        promptTokenIds: wrong.promptTokenIds,
        completionTokenIds: wrong.tokens.map((t) => t.tokenId),
        modelVersion: wrong.modelVersion,
        tokenLabels: [{ position: at, weight: -1, replacementTokenId: replacement.tokenId }],
        annotatorId: "examples/feedback.ts",
      },
    ]);
    const result = submitted.results[0];
    console.log(`submitted ${annotationId}: status ${result.status} rows ${result.rows}`);

    // 3. Train one step and show its progress.
    for await (const progress of trainer.train({ steps: 1 })) {
      console.log(
        progress.done
          ? `done: model version ${progress.modelVersion}, published ${progress.publishedVersion} ${progress.message}`
          : `step ${progress.step}/${progress.totalSteps}: loss ${progress.loss.toFixed(4)} ` +
              `token ${progress.tokenLoss.toFixed(4)} kl ${progress.kl.toFixed(5)} rows ${progress.rows}`,
      );
    }

    // 4. The same tokens under the weights the policy server holds now (one step moves them a
    //    little; the step's batch may hold other pending annotations too).
    const again = async (ids: number[]) =>
      (await policy.score({ promptTokenIds: wrong.promptTokenIds, completionTokenIds: ids })).tokens[at].logprob;
    const badAfter = await again(wrong.tokens.map((t) => t.tokenId));
    const replacementAfter = await again(right.tokens.map((t) => t.tokenId));
    console.log(
      `logprob of ${JSON.stringify(bad.text)} ${bad.logprob.toFixed(3)} -> ${badAfter.toFixed(3)}, ` +
        `of ${JSON.stringify(replacement.text)} ${replacement.logprob.toFixed(3)} -> ${replacementAfter.toFixed(3)}`,
    );
  } finally {
    policy.close();
    trainer.close();
  }
}

main().catch((err: unknown) => {
  console.error(err instanceof TokenfeedbackError ? `error: ${err.message}` : err);
  process.exitCode = 1;
});
