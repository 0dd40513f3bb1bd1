"""Data: vocabularies, bundled real corpora, seqio tasks' building blocks and the input pipeline.

TF-free (importable alone): `vocab` (T5-id SentencePiece vocabularies), `corpora` (the bundled
Shakespeare / Wikipedia / Rotten Tomatoes corpora and local text, one module per job; `bundled` is its
deprecated re-export), `settings` (gin macros for data locations), `span_corruption` (lengths + NumPy
reference), `superglue` (JSONL reading, T5 format, postprocessors), `superglue_metrics`, `pipeline`
(imports seqio only when an iterator is built).
seqio/TensorFlow: `preprocessors`, `sources`, `seqio_vocab` (used by the registrations in stmoe.tasks).
The commands `stmoe vocab` and `stmoe data` live in stmoe.cli.vocab and stmoe.cli.data. See docs/data.md.
"""
