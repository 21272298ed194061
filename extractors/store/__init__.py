"""extractors.store: the store of embeddings on disk: its layout, update plans, staging,
commits, grouping and duplicates."""
