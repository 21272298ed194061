"""heads: classical heads, the evaluation protocol, plots and persistence."""
