import grpc
import pytest

from cyllm import errors
from cyllm.protocol import status


class FakeRpcError(grpc.aio.AioRpcError):
    def __init__(self, code, details, trailing=()):
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details)


@pytest.mark.parametrize(
    "err, code",
    [
        (errors.InvalidRequest("bad", param="x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ContextLengthExceeded("long"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ModelNotFound("nope"), grpc.StatusCode.NOT_FOUND),
        (errors.NotFound("no such job", param="id"), grpc.StatusCode.NOT_FOUND),
        (errors.Overloaded("full", retry_after=7), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unavailable("down"), grpc.StatusCode.UNAVAILABLE),
        (errors.EngineError("boom"), grpc.StatusCode.INTERNAL),
    ],
)
def test_errors_survive_the_round_trip_through_grpc(err, code):
    got_code, details, metadata = status.to_grpc(err)
    assert got_code == code
    back = status.from_grpc(FakeRpcError(got_code, details, metadata))
    assert type(back) is type(err)
    assert back.message == err.message
    assert back.param == err.param
    if isinstance(err, errors.Overloaded):
        assert back.retry_after == 7


def test_a_bare_transport_failure_is_unreachable_but_an_answered_one_is_not():
    back = status.from_grpc(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert isinstance(back, errors.Unreachable)  # nobody answered: try another peer
    code, details, metadata = status.to_grpc(errors.Unavailable("no worker"))
    answered = status.from_grpc(FakeRpcError(code, details, metadata))
    assert type(answered) is errors.Unavailable  # a peer said so: not worth another


def test_an_unknown_status_becomes_an_engine_error():
    back = status.from_grpc(FakeRpcError(grpc.StatusCode.DATA_LOSS, "lost"))
    assert isinstance(back, errors.EngineError)
