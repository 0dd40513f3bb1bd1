"""Evaluation: loss metrics on a split, task metrics by decoding, predictions for your own inputs, priming.

* :mod:`stmoe.evaluation.loss` -- the one evaluation loop (teacher-forced loss metrics) and `evaluate(...)`;
* :mod:`stmoe.evaluation.task_metrics` -- decode a task split and run its seqio metric functions;
* :mod:`stmoe.evaluation.predictions` -- read JSONL/TSV inputs, decode them, write JSONL;
* :mod:`stmoe.evaluation.priming` -- zero/few-shot priming: candidate answers scored after k demonstrations
  (the tasks: :mod:`stmoe.evaluation.priming_tasks`).
"""
