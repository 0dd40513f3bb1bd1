"""Deprecated alias (one release): task-metric evaluation moved to `stmoe.evaluation.task_metrics`
(library) and `stmoe eval --checkpoint` to `stmoe.cli.eval`."""

from stmoe.evaluation.task_metrics import (  # noqa: F401
    EOS_ID, TaskEvalResult, decode_texts, evaluate_task, example_text, majority_baseline, predict_texts,
    run_task_eval, task_targets, tasks_with_metrics, trim_ids, write_predictions, write_results)

__all__ = ["EOS_ID", "TaskEvalResult", "decode_texts", "evaluate_task", "example_text", "majority_baseline",
           "predict_texts", "run_task_eval", "task_targets", "tasks_with_metrics", "trim_ids",
           "write_predictions", "write_results"]
