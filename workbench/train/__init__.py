"""Training one run: the ``trainer`` loop and its flat fused AdamW (``optim``)."""
