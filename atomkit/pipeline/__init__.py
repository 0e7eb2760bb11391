"""The pipeline: the Session that keeps modules resident, the tasks over it (caption, index, retrieve,
assemble), the executors that schedule encoder and decoder, and the memory budget."""
