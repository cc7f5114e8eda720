"""The coordinator's gRPC API, one servicer per subject of the contract
(``protocol/cyllm.proto``), each constructed with what it needs:

- ``inference.py`` — ``Inference``: generations (prompt cache, idempotency, the queue,
  failover over workers) and embeddings;
- ``models.py`` — ``Models``: what is served where, loading and unloading, the cluster's
  status;
- ``training.py`` — ``Training``: fine-tuning jobs, and ``Files``: uploaded datasets;
- ``pool.py`` — ``WorkerPool``: workers registering, heartbeating and leaving.

Errors become gRPC statuses at the server's edge (``protocol.server``); whose call it
is comes from its metadata (``protocol.tenant``); who owns a model from
``coordinator.owners``, the same answer the scheduler reads.
"""
