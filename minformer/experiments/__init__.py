"""Experiments the CLI runs with ``minformer experiment NAME``: each trains, measures and writes a
table and a plot into its output folder."""
