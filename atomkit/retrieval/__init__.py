"""Retrieval: ranking captions against a prompt, the SQLite library of captioned clips, incremental indexing
and indexing on Ray."""
