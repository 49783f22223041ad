"""Applications on top of graphgen.LLM: the batch job (job=batch) and the completion example."""
