"""Generation: prefill and decode over the model's MLA KV cache, sampling, MTP speculative decoding."""
