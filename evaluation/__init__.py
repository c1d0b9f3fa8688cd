"""dmlkd.evaluation."""
