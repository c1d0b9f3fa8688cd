"""dmlkd.transfer."""
