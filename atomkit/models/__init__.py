"""The models: specs by name (registry), where weights come from, and the encoder, decoder and embedder
modules a spec builds."""
