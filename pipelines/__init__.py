"""dmlkd.pipelines."""
