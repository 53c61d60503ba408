"""Methods that lost on the dev table, kept runnable on the public API (not part of the library)."""
