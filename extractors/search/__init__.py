"""extractors.search: queries over a store: by image, by id, by filters, and their results."""
