"""heads.scoring: scoring a source with a classifier into a predictions table: the runner, the
table (columns, parts, its folder lock) and the writer of its rows."""
