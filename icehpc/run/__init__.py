"""How stages are started: the stage table, the CLI, submitit submission and the pipeline."""
