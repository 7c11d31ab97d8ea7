"""Samplers over the device mesh, a sampleable model from an export or a workdir, sample shards."""
