"""dmlkd.student."""
