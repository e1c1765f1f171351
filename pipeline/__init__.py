"""samcp.pipeline: data flow — datasets, proposal generators, cache I/O, distributed runner, eval."""
