"""A run on disk: the checkpoint format and its safe loading, what changed since a checkpoint, finding
unfinished runs, atomic files and the run directory's lock, and reading files from elsewhere within bounds."""
