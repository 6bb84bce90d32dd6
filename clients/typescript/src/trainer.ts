// TrainerClient: the trainer's RPCs (tokenfeedback.v1.TrainerService) as typed methods.
// Requests are plain objects in the shape of the generated messages (camelCase fields); replies
// are the generated message types. Train's progress is an async iterable.

import type { MessageInitShape } from "@bufbuild/protobuf";
import {
  TrainerService,
  type AnnotatedSequenceSchema,
  type SaveCheckpointResponse,
  type StoredAnnotation,
  type SubmitAnnotationsResponse,
  type TrainProgress,
  type TrainRequestSchema,
  type TrainerStatus,
  type WithdrawAnnotationsResponse,
} from "../gen/tokenfeedback/v1/trainer_pb.js";
import { Connection, type CallOptions, type ClientOptions } from "./connection.js";

export type AnnotatedSequenceInit = MessageInitShape<typeof AnnotatedSequenceSchema>;
export type TrainRequestInit = MessageInitShape<typeof TrainRequestSchema>;

export interface SubmitOptions extends CallOptions {
  /** Store the valid sequences and answer the invalid ones REJECTED, instead of failing the call. */
  partialOk?: boolean;
}

export class TrainerClient {
  readonly connection: Connection;

  /** `address` is HOST:PORT (grpcs://HOST:PORT for TLS with Node's roots). */
  constructor(address: string, options: ClientOptions = {}) {
    this.connection = new Connection(address, options);
  }

  /** Validate and store annotated sequences; one result per sequence, in order. Retried on
   * UNAVAILABLE: an annotation id makes a resend harmless (DUPLICATE). */
  submitAnnotations(sequences: AnnotatedSequenceInit[], options: SubmitOptions = {}): Promise<SubmitAnnotationsResponse> {
    const { partialOk = false, ...call } = options;
    return this.connection.unary(TrainerService.method.submitAnnotations, { sequences, partialOk }, true, call);
  }

  /** Mark stored annotations withdrawn (never trained on again); unknown ids are reported. */
  withdrawAnnotations(annotationIds: string[], call?: CallOptions): Promise<WithdrawAnnotationsResponse> {
    return this.connection.unary(TrainerService.method.withdrawAnnotations, { annotationIds }, true, call);
  }

  /** One stored annotation with the training rows it became (NotFoundError when unknown). */
  getAnnotation(annotationId: string, call?: CallOptions): Promise<StoredAnnotation> {
    return this.connection.unary(TrainerService.method.getAnnotation, { annotationId }, true, call);
  }

  /** Run optimizer steps: yields one progress message per step, then a final one with done set.
   * Not retried (steps change the model). Breaking out of the loop cancels the call. */
  train(request: TrainRequestInit = {}, call?: CallOptions): AsyncGenerator<TrainProgress, void, undefined> {
    return this.connection.serverStream(TrainerService.method.train, request, false, call);
  }

  /** Write a checkpoint now (an admin credential when auth is on). */
  saveCheckpoint(call?: CallOptions): Promise<SaveCheckpointResponse> {
    return this.connection.unary(TrainerService.method.saveCheckpoint, {}, false, call);
  }

  /** Counts, versions, last losses, and the version each policy server holds. */
  getStatus(call?: CallOptions): Promise<TrainerStatus> {
    return this.connection.unary(TrainerService.method.getStatus, {}, true, call);
  }

  close(): void {
    this.connection.close();
  }
}
