"""Where the code runs: device mesh and sharding, multi-host start-up, files on any path, lazy TensorFlow."""
