"""common/rpc.py's binder: one handler served with gRPC's and Connect's calling conventions, the
error mapping on both, closed streams closing the handler, refused and missing RPCs."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

import tokenfeedback.v1.policy_pb2 as pb
from common.errors import InvalidArgument
from common.rpc import connect_service, grpc_servicer, snake_case
from policy_server.convert import DESCRIPTOR


class Aborted(Exception):
    pass


class FakeContext:
    """What rpc_method uses of a grpc.aio context: abort() records the status and raises."""

    def __init__(self):
        self.status = None

    async def abort(self, code, message):
        self.status = (code, message)
        raise Aborted(message)


class Handler:
    def __init__(self):
        self.closed = False

    async def generate(self, request):
        try:
            for i in range(3):
                yield pb.GenerateEvent(token=pb.TokenEvent(position=i))
        finally:
            self.closed = True

    async def score(self, request):
        if not request.prompt_text:
            raise InvalidArgument("empty prompt", "prompt_text")
        return pb.ScoreResponse(completion_text=request.prompt_text.upper())

    async def tokenize(self, request):
        raise ZeroDivisionError("boom")

    async def align_spans(self, request):
        return pb.AlignSpansResponse()

    async def get_model_info(self, request):
        return pb.ModelInfo(model_name="m")

    async def update_weights(self, requests):
        return pb.UpdateWeightsResponse(tensors_updated=len([m async for m in requests]))


def run(coro):
    return asyncio.run(coro)


def test_snake_case():
    assert [snake_case(m.name) for m in DESCRIPTOR.methods] == [
        "generate", "score", "tokenize", "align_spans", "get_model_info", "update_weights"]


def test_grpc_calls_the_handler_and_maps_errors():
    servicer = grpc_servicer(Handler(), DESCRIPTOR)
    ok = run(servicer.Score(pb.ScoreRequest(prompt_text="ab"), FakeContext()))
    assert ok.completion_text == "AB"
    context = FakeContext()
    with pytest.raises(Aborted):
        run(servicer.Score(pb.ScoreRequest(), context))
    assert context.status == (grpc.StatusCode.INVALID_ARGUMENT, "prompt_text: empty prompt")
    context = FakeContext()
    with pytest.raises(Aborted):
        run(servicer.Tokenize(pb.TokenizeRequest(), context))
    assert context.status[0] == grpc.StatusCode.INTERNAL and "ZeroDivisionError: boom" in context.status[1]

    async def messages():
        for _ in range(4):
            yield pb.WeightUpdateMessage()

    assert run(servicer.UpdateWeights(messages(), FakeContext())).tensors_updated == 4


def test_connect_calls_the_handler_and_maps_errors():
    service = connect_service(Handler(), DESCRIPTOR)
    assert run(service.get_model_info(pb.GetModelInfoRequest(), None)).model_name == "m"
    with pytest.raises(ConnectError) as err:
        run(service.score(pb.ScoreRequest(), None))
    assert err.value.code == Code.INVALID_ARGUMENT and "prompt_text" in str(err.value)


@pytest.mark.parametrize("bind", [grpc_servicer, connect_service])
def test_streams_and_closing_them_closes_the_handler(bind):
    handler = Handler()
    method = getattr(bind(handler, DESCRIPTOR), "Generate" if bind is grpc_servicer else "generate")

    async def first_only():
        stream = method(pb.GenerateRequest(), FakeContext())
        first = await anext(stream)
        await stream.aclose()  # what a cancelled call does to the transport's generator
        return first

    assert run(first_only()).token.position == 0
    assert handler.closed

    async def all_of():
        return [e.token.position async for e in method(pb.GenerateRequest(), FakeContext())]

    assert run(all_of()) == [0, 1, 2]


def test_unimplemented_and_missing_methods():
    service = connect_service(Handler(), DESCRIPTOR, {"UpdateWeights": "served over gRPC only"})
    with pytest.raises(ConnectError) as err:
        run(service.update_weights(None, None))
    assert err.value.code == Code.UNIMPLEMENTED and "gRPC only" in str(err.value)

    class Partial(Handler):
        align_spans = None

    with pytest.raises(TypeError, match="align_spans"):
        grpc_servicer(Partial(), DESCRIPTOR)
