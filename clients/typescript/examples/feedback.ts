// The feedback loop in one script: generate a completion, mark its least probable token bad
// (naming the model's own favourite at that position as the replacement), submit the annotation,
// and train one step.
//
//   node dist/examples/feedback.js [POLICY_ADDR] [TRAINER_ADDR] [PROMPT]
//
// Addresses default to $TOKENFEEDBACK_POLICY_ADDR / $TOKENFEEDBACK_TRAINER_ADDR, then
// $TOKENFEEDBACK_POLICY / $TOKENFEEDBACK_TRAINER (what `tokenfeedback serve` prints), then
// 127.0.0.1:50051 / 127.0.0.1:50052 (where it binds). With auth and TLS on, set
// $TOKENFEEDBACK_TOKEN (an admin token: Train needs one) and $TOKENFEEDBACK_CA (roots PEM file).

import { randomUUID } from "node:crypto";
import { PolicyClient, TokenfeedbackError, TrainerClient, type ClientOptions } from "../src/index.js";

async function main(): Promise<void> {
  const env = process.env;
  const [
    policyAddr = env.TOKENFEEDBACK_POLICY_ADDR || env.TOKENFEEDBACK_POLICY || "127.0.0.1:50051",
    trainerAddr = env.TOKENFEEDBACK_TRAINER_ADDR || env.TOKENFEEDBACK_TRAINER || "127.0.0.1:50052",
    prompt = "The capital of Canada is",
  ] = process.argv.slice(2);
  const options: ClientOptions = {
    token: process.env.TOKENFEEDBACK_TOKEN || undefined,
    rootCertificates: process.env.TOKENFEEDBACK_CA || undefined,
  };
  const policy = new PolicyClient(policyAddr, options);
  const trainer = new TrainerClient(trainerAddr, options);
  try {
    // 1. Generate, streaming the tokens as they come.
    const { start, tokens, end } = await policy.complete({
      promptText: prompt,
      params: { maxNewTokens: 12, temperature: 1.0, numAlternatives: 5, seed: 7n },
    });
    console.log(`prompt:     ${JSON.stringify(start.promptText)} (model version ${start.modelVersion})`);
    console.log(`completion: ${JSON.stringify(end.completionText)}`);
    if (tokens.length === 0) throw new Error("the model generated no tokens");

    // 2. The least probable token is the one to mark bad.
    const worst = tokens.reduce((a, b) => (b.logprob < a.logprob ? b : a));
    const favourite = worst.alternatives.find((alt) => alt.tokenId !== worst.tokenId);
    console.log(
      `worst token: #${worst.position} ${JSON.stringify(worst.text)} logprob ${worst.logprob.toFixed(3)}` +
        (favourite ? `; replacement ${JSON.stringify(favourite.text)} (${favourite.logprob.toFixed(3)})` : ""),
    );

    // 3. Submit the annotation (the sampled ids are the truth; the behavior logprobs let the
    //    trainer correct for sampling).
    const annotationId = `example-ts-${randomUUID()}`;
    const submitted = await trainer.submitAnnotations([
      {
        annotationId,
        promptTokenIds: start.promptTokenIds,
        completionTokenIds: tokens.map((t) => t.tokenId),
        modelVersion: start.modelVersion,
        behaviorLogprobs: tokens.map((t) => t.samplingLogprob),
        tokenLabels: [{ position: worst.position, weight: -1, replacementTokenId: favourite?.tokenId }],
        annotatorId: "examples/feedback.ts",
      },
    ]);
    const result = submitted.results[0];
    console.log(`submitted ${annotationId}: status ${result.status} rows ${result.rows}`);

    // 4. Train one step and show its progress.
    for await (const progress of trainer.train({ steps: 1 })) {
      console.log(
        progress.done
          ? `done: model version ${progress.modelVersion}, published ${progress.publishedVersion} ${progress.message}`
          : `step ${progress.step}/${progress.totalSteps}: loss ${progress.loss.toFixed(4)} ` +
              `token ${progress.tokenLoss.toFixed(4)} kl ${progress.kl.toFixed(5)} rows ${progress.rows}`,
      );
    }
  } finally {
    policy.close();
    trainer.close();
  }
}

main().catch((err: unknown) => {
  console.error(err instanceof TokenfeedbackError ? `error: ${err.message}` : err);
  process.exitCode = 1;
});
