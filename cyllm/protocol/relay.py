"""A generation as its client sees it, while the process producing it may die.

Two tiers hold a client's stream: the coordinator (over a worker) and the gateway (over
a coordinator).  Each passes the events of its upstream through a :class:`Relay`, which
remembers what went to the client: whether a ``Started`` did, the token ids of every
``Delta`` and their text.  When the upstream dies or stalls, ``continuation()`` is the
same request carrying that (``GenerateRequest.resume``); the next upstream's engine
continues from the prompt plus those tokens (``worker/engines/base.py``) and its stream
is the rest: the relay drops its second ``Started``, so the client sees one stream with
no gap and no repeat.  A stream whose text came without token ids (a prompt-cache
replay) cannot be continued that way.
"""

from __future__ import annotations

from cyllm.protocol import pb


class Relay:
    def __init__(self, request: pb.GenerateRequest) -> None:
        self.request = request
        self.ids: list[int] = list(request.resume.token_ids)
        self.text: list[str] = [request.resume.text] if request.resume.text else []
        self.started = False  # a Started went to the client
        self.finished = False

    def pass_on(self, msg: pb.GenerateResponse) -> bool:
        """Record ``msg``; False when it must not reach the client (a repeated Started)."""
        kind = msg.WhichOneof("event")
        if kind == "started":
            if self.started:
                return False
            self.started = True
        elif kind == "delta":
            self.ids.extend(msg.delta.token_ids)
            if msg.delta.text:
                self.text.append(msg.delta.text)
        elif kind == "finished":
            self.finished = True
        return True

    @property
    def resumable(self) -> bool:
        return bool(self.ids) or not self.text

    @property
    def resuming(self) -> bool:
        """Something went to the client: a next upstream continues rather than starts."""
        return self.started or bool(self.ids)

    def continuation(self) -> pb.GenerateRequest:
        """The request for the next upstream."""
        request = pb.GenerateRequest()
        request.CopyFrom(self.request)
        if self.ids:
            request.resume.token_ids[:] = self.ids
            request.resume.text = "".join(self.text)
        else:
            request.ClearField("resume")
        return request
