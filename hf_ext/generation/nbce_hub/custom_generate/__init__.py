"""NBCE custom generation method (self-contained: torch + transformers)."""
