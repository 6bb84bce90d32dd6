"""PolicyService over gRPC: the handler of convert.py bound as a grpc.aio servicer, nothing else.

Each RPC is written once in convert.py's PolicyHandler; common/rpc.py's binder gives it the
grpc.aio calling convention and the error mapping (docs/design.md, "Servers").
"""

from __future__ import annotations

import grpc

import tokenfeedback.v1.policy_pb2_grpc as policy_pb2_grpc
from common.rpc import grpc_servicer
from policy_server.convert import DESCRIPTOR, SERVICE_NAME, PolicyHandler

__all__ = ["SERVICE_NAME", "register"]


def register(handler: PolicyHandler):
    """For common.rpc.create_grpc_server's `register` list."""

    def add(server: grpc.aio.Server) -> None:
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(grpc_servicer(handler, DESCRIPTOR), server)

    return add
