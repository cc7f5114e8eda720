"""Running fine-tuning jobs on a worker (the job itself is ``cyllm.training``).

``train.py`` is the training loop that runs in a child process (``python -m
cyllm.worker.training.train``); ``runner.py`` starts that process — or a user's script —
reads its progress lines, enforces the time limit and stops it on cancel; ``jobs.py``
is the worker's side of the coordinator's ``Train`` call; ``launch.py`` makes the child
die with the worker.
"""
