"""Stage one: the teacher resolved once and run once over the corpus; the features store it writes (Parquet and
`.npy`) and that every later stage reads. Never imports training, evaluation or export code."""
