"""The LISA algorithm: layer discovery, the layer sampler, the optimizer-state policy and the training step."""
