"""SuperGLUE tasks (T5 text-to-text format, official metrics) and the super_glue_v102 mixture.

Data: the official JSONL distribution under SUPERGLUE_DIR when bound, else TFDS super_glue/*:1.0.2.
"""

from __future__ import annotations

import seqio

from stmoe.data import sources, superglue, superglue_metrics
from stmoe.data.seqio_vocab import output_features

# Training-set sizes of the official distribution, used as mixing rates (examples-proportional).
TRAIN_SIZES = {"boolq": 9427, "cb": 250, "copa": 400, "multirc": 27243, "record": 100730,
               "rte": 2490, "wic": 5428, "wsc.fixed": 554}


def task_name(task: str) -> str:
  return f"super_glue_{task}_v102"


def _postprocess_fn(task: str):
  return superglue.record_postprocessor if task == "record" else superglue.label_postprocessor(task)


for _task in superglue.TASKS:
  if task_name(_task) not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        task_name(_task),
        source=sources.superglue_source(_task),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features=output_features(),
        postprocess_fn=_postprocess_fn(_task),
        metric_fns=superglue_metrics.metric_fns(_task))

if "super_glue_v102" not in seqio.MixtureRegistry.names():
  seqio.MixtureRegistry.add("super_glue_v102", [(task_name(t), n) for t, n in TRAIN_SIZES.items()])
