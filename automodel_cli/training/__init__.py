"""The training-run kit: what every training recipe shares, configured from the resolved config.

``TrainingRun`` owns the processes and mesh, precision, the run directory, loggers, optimizer
and schedule, resume, the step loop, checkpoints, evaluation and the Hugging Face outputs; a
recipe supplies its model(s), its data and a step function. docs/plugins.md (recipes) shows a
complete plugin recipe on it.
"""
