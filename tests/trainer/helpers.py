"""Helpers of the trainer suite (plain functions; fixtures are in conftest.py)."""

from __future__ import annotations

import socket

import grpc

import tokenfeedback.v1.policy_pb2_grpc as policy_pb2_grpc
import tokenfeedback.v1.trainer_pb2 as trainer_pb2
import tokenfeedback.v1.trainer_pb2_grpc as trainer_pb2_grpc


def trainer_stub(address: str) -> trainer_pb2_grpc.TrainerServiceStub:
    return trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(address))


def policy_stub(address: str) -> policy_pb2_grpc.PolicyServiceStub:
    return policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(address))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(stub, **fields) -> list[trainer_pb2.TrainProgress]:
    """Run Train to the end; the whole stream."""
    return list(stub.Train(trainer_pb2.TrainRequest(**fields), timeout=300))


def status(stub) -> trainer_pb2.TrainerStatus:
    return stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=30)


def simple_sequence(annotation_id: str, prompt=(1, 2, 3), completion=(4, 5, 6, 7), **fields):
    """A valid annotated sequence: token 1 of the completion marked bad."""
    fields.setdefault("token_labels", [trainer_pb2.TokenLabel(position=1, weight=-1.0)])
    return trainer_pb2.AnnotatedSequence(
        annotation_id=annotation_id, prompt_token_ids=list(prompt), completion_token_ids=list(completion), **fields
    )

