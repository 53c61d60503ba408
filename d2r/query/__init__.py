"""The query path: search, verification, expansion."""
