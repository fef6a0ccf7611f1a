"""The embedded demo: synthetic stimuli and tiny models, trained briefly (or untrained stand-ins)."""
