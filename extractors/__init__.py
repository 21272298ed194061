"""extractors package."""
