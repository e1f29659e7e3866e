"""Console entry points: thin typer apps over the library (`aldm`, `aldm-infer`)."""
