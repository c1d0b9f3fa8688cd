"""dmlkd.data."""
