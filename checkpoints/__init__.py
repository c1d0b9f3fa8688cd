"""dmlkd.checkpoints."""
