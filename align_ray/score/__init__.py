"""``align-ray score``: image/text embeddings and the pair score of every row, as Ray Data batch
inference over a stage directory (or any parquet), written in the stage layout."""
