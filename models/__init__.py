"""dmlkd.models."""
