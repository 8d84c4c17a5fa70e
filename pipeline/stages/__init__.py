"""One module per stage; each has `run(ctx)` reading earlier artifacts from the run directory."""
