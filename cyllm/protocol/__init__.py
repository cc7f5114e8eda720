"""The gRPC contract (``cyllm.proto``), its generated code and the error mapping.

Regenerate the code after editing the ``.proto``: ``make proto``.
"""

from cyllm.protocol import cyllm_pb2 as pb
from cyllm.protocol import cyllm_pb2_grpc as rpc

__all__ = ["pb", "rpc"]
