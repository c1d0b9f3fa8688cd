"""dmlkd.teacher."""
