"""seqio task and mixture registrations (installed as `stmoe.tasks`; importing registers them).

Pretraining (`pretraining.py`), for each corpus in shakespeare, wikipedia, text (TEXT_FILES glob), c4
(TFDS c4/en): `<corpus>_span_corruption` (encoder-decoder, or decoder-only with the prefix-LM
converter), `<corpus>_prefix_lm` (decoder-only prefix LM) and `<corpus>_lm` (decoder-only causal LM).
Fine-tuning (`super_glue.py`): `super_glue_<task>_v102` for boolq, cb, copa, multirc, record, rte, wic,
wsc, wsc.fixed, axb, axg and the `super_glue_v102` mixture. Bundled real tasks (`bundled_tasks.py`):
`shakespeare_genre`, `rotten_tomatoes_polarity`. See docs/data.md.
"""

from . import bundled_tasks  # noqa: F401
from . import pretraining  # noqa: F401
from . import super_glue  # noqa: F401
