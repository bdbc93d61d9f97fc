"""Batch runs: many prompts from a JSONL file, answered into a resumable JSONL file.

See :mod:`.jobs` for both files' shapes and the guarantees of the output.
"""
