"""Evaluation: loss metrics on a split, task metrics by decoding, and predictions for your own inputs.

* :mod:`stmoe.evaluation.loss` -- the one evaluation loop (teacher-forced loss metrics) and `evaluate(...)`;
* :mod:`stmoe.evaluation.task_metrics` -- decode a task split and run its seqio metric functions;
* :mod:`stmoe.evaluation.predictions` -- read JSONL/TSV inputs, decode them, write JSONL.
"""
