"""Stage one, second half: FAISS hard negatives from the cached teacher embeddings."""
