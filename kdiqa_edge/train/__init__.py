"""Training recipes (torch): the shared engine, the teacher fine-tune, the teacher feature cache."""
