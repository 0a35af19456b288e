"""diffusers AutoencoderKL folders -> vistok KL tokenizer (written in the next step)."""
