"""The data the pipeline stores between stages: the canonical image data set (`dataset`: its
Parquet format, writer and readers), the image sources that fill it (`sources/`, one module per
`data.source`, found by name), and the embeddings table `extract` writes and every later stage
reads (`embeddings`)."""
