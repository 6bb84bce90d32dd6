// PolicyClient: the policy server's RPCs (tokenfeedback.v1.PolicyService) as typed methods.
// Requests are plain objects in the shape of the generated messages (camelCase fields); replies
// are the generated message types. Streams are async iterables; errors are TokenfeedbackErrors.

import type { MessageInitShape } from "@bufbuild/protobuf";
import {
  PolicyService,
  type AlignSpansRequestSchema,
  type AlignSpansResponse,
  type GenerateEvent,
  type GenerateRequestSchema,
  type GenerationEnd,
  type GenerationStart,
  type ModelInfo,
  type ScoreRequestSchema,
  type ScoreResponse,
  type TokenEvent,
  type TokenizeRequestSchema,
  type TokenizeResponse,
  type UpdateWeightsResponse,
  type WeightUpdateMessageSchema,
} from "../gen/tokenfeedback/v1/policy_pb.js";
import { Connection, type CallOptions, type ClientOptions } from "./connection.js";
import { TokenfeedbackError } from "./errors.js";

export type GenerateRequestInit = MessageInitShape<typeof GenerateRequestSchema>;
export type ScoreRequestInit = MessageInitShape<typeof ScoreRequestSchema>;
export type TokenizeRequestInit = MessageInitShape<typeof TokenizeRequestSchema>;
export type AlignSpansRequestInit = MessageInitShape<typeof AlignSpansRequestSchema>;
export type WeightUpdateMessageInit = MessageInitShape<typeof WeightUpdateMessageSchema>;

/** A finished generation: its start event, every token event in order, and its end event. */
export interface Completion {
  start: GenerationStart;
  tokens: TokenEvent[];
  end: GenerationEnd;
}

export class PolicyClient {
  readonly connection: Connection;

  /** `address` is HOST:PORT (grpcs://HOST:PORT for TLS with Node's roots). */
  constructor(address: string, options: ClientOptions = {}) {
    this.connection = new Connection(address, options);
  }

  /** Sample a completion: yields a `start` event, one `token` event per sampled token, then an
   * `end` event (see GenerateEvent.event.case). Breaking out of the loop cancels the generation. */
  generate(request: GenerateRequestInit, call?: CallOptions): AsyncGenerator<GenerateEvent, void, undefined> {
    // Nothing happens on the server before the first event: safe to retry until then.
    return this.connection.serverStream(PolicyService.method.generate, request, true, call);
  }

  /** Generate and collect the whole stream. */
  async complete(request: GenerateRequestInit, call?: CallOptions): Promise<Completion> {
    let start: GenerationStart | undefined;
    let end: GenerationEnd | undefined;
    const tokens: TokenEvent[] = [];
    for await (const { event } of this.generate(request, call)) {
      if (event.case === "start") start = event.value;
      else if (event.case === "token") tokens.push(event.value);
      else if (event.case === "end") end = event.value;
    }
    if (!start || !end) {
      throw new TokenfeedbackError(`Generate stream ended without its ${start ? "end" : "start"} event`, null, {
        method: "tokenfeedback.v1.PolicyService/Generate",
        address: this.connection.address,
      });
    }
    return { start, tokens, end };
  }

  /** Teacher-forced log-probabilities of given completion tokens after a prompt. */
  score(request: ScoreRequestInit, call?: CallOptions): Promise<ScoreResponse> {
    return this.connection.unary(PolicyService.method.score, request, true, call);
  }

  /** Text to tokens with character offsets, or token ids to text pieces. */
  tokenize(request: TokenizeRequestInit, call?: CallOptions): Promise<TokenizeResponse> {
    return this.connection.unary(PolicyService.method.tokenize, request, true, call);
  }

  /** Which tokens each character span covers. */
  alignSpans(request: AlignSpansRequestInit, call?: CallOptions): Promise<AlignSpansResponse> {
    return this.connection.unary(PolicyService.method.alignSpans, request, true, call);
  }

  /** Model name, vocabulary, special tokens, limits and current version. */
  getModelInfo(call?: CallOptions): Promise<ModelInfo> {
    return this.connection.unary(PolicyService.method.getModelInfo, {}, true, call);
  }

  /** Replace the model's weights (header, chunks, commit; an admin credential when auth is on). */
  updateWeights(
    messages: AsyncIterable<WeightUpdateMessageInit> | Iterable<WeightUpdateMessageInit>,
    call?: CallOptions,
  ): Promise<UpdateWeightsResponse> {
    return this.connection.clientStream(PolicyService.method.updateWeights, messages, call);
  }

  close(): void {
    this.connection.close();
  }
}
