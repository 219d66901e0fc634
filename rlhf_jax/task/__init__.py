"""The embedded task world, its evaluation and the pipeline's run report."""
