"""Input pipelines: the datasets, image folders and the LDM first stage (latent encoding)."""
