"""dmlkd.engine."""
