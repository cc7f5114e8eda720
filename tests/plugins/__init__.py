"""A deployment's own code, as the config names it (dataset formatters)."""
