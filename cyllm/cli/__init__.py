"""The ``cyllm`` command: servers (``server``) and clients of a running gateway
(``client``), on one root (``root``)."""

from cyllm.cli import batches, chat, client, server, training, usage  # noqa: F401  (they add their commands to the app)
from cyllm.cli.root import app

__all__ = ["app"]
