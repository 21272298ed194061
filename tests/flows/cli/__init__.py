"""Tests of what the CLI prints, as a person reads it in a terminal."""
