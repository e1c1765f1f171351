"""samcp.cli: thin click commands that parse, validate and call samcp.pipeline."""
