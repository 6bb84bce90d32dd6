// tokenfeedback's Node client: PolicyClient and TrainerClient over @grpc/grpc-js, the generated
// tokenfeedback.v1 message types (protoc-gen-es), and typed errors.

export * from "./errors.js";
export * from "./connection.js";
export * from "./policy.js";
export * from "./trainer.js";
export * from "../gen/tokenfeedback/v1/common_pb.js";
export * from "../gen/tokenfeedback/v1/policy_pb.js";
export * from "../gen/tokenfeedback/v1/trainer_pb.js";
export { create, toJson, fromJson, toBinary, fromBinary } from "@bufbuild/protobuf";
