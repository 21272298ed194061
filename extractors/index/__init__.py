"""extractors.index: the FAISS index of a store: its kinds, their recall, and keeping it in
step with the store."""
