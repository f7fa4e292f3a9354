"""A sweep: which runs to train (``driver``), one run as a job (``jobs``), who trains it
(``executors``), and the per-run claims that keep two processes off one run (``claims``)."""
