"""What a fine-tuning job is, shared by the three processes that handle one: the job
spec (``spec.py``, checked where a job enters and again where it runs), the methods
(``methods.py``, names mapped onto PEFT) and the dataset readers (``data.py``, the eight
formats read into conversations; the coordinator reads uploads with them).

Nothing here imports torch, transformers or PEFT at module level, so the gateway and
the coordinator load it without the model runtime; the worker's ``cyllm.worker.training``
runs the jobs.
"""
