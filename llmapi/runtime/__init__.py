"""Model runner, sampler and KV cache: what runs one step of a batch on a rank."""
