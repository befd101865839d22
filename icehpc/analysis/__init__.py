"""Numbers out: the HDF5 embedding store, MPI embedding, κ reduction, report and probes."""
