"""Fine-tuning on a worker.

``spec.py`` is a job's definition (validated once, by the coordinator and again here);
``data.py`` reads the eight dataset formats into conversations and tokenises them;
``methods.py`` maps method names onto PEFT; ``train.py`` is the training loop that runs
in a child process (``python -m cyllm.worker.training.train``); ``runner.py`` starts that
process — or a user's script — reads its progress lines, enforces the time limit and
stops it on cancel.
"""
