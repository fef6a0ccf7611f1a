"""The embedded demo: synthetic stimuli and tiny, untrained stand-in models."""
