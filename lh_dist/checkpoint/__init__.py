"""Checkpoints and run directories, in one place: the format and how it is read (`format`), writing
checkpoints that a crash cannot corrupt and the rules for what a run may resume from (`checkpointer`),
and the run directory's lock, checks and archive (`run_dir`). Training, evaluation, import and export
all go through here."""
