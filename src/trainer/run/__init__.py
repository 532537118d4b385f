"""A run on disk: the checkpoint format and its safe loading, the resumable state, what changed since a
checkpoint, finding unfinished runs, atomic files and the run directory's lock."""
