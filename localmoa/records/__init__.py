"""The run log: every run, its calls and its loads, kept in SQLite (see :mod:`.store`)."""
