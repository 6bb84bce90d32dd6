"""TrainerService over grpc.aio: the RPCs of convert.py's TrainerHandler, bound by common/rpc.py.

Nothing here but the binding: each RPC is written once, in convert.py, and served over this port
and the Connect port (connect.py) alike; errors are mapped to status codes by the binder
(docs/design.md, "Servers").
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

import tokenfeedback.v1.trainer_pb2_grpc as trainer_pb2_grpc
from common.rpc import grpc_servicer
from trainer_server.convert import DESCRIPTOR, TrainerHandler


def register(handler: TrainerHandler) -> Callable[[grpc.aio.Server], None]:
    """What create_grpc_server calls to add TrainerService, served by `handler`."""

    def add(server: grpc.aio.Server) -> None:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(grpc_servicer(handler, DESCRIPTOR), server)

    return add
