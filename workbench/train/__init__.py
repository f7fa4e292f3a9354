"""Training one run: the loop (``trainer``), handed its parts by ``factory.build_trainer``;
what a job sets for its whole process (``process``); checkpoints (``checkpoint``); the flat
fused AdamW (``optim``)."""
