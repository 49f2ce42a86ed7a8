"""One typer CLI per pipeline stage; each only parses options and calls `pipeline`."""
