"""Image-text retrieval with the BLIP family: model adapters, the two-stage searcher and the CLI.

Importing this package is cheap; torch and transformers load only when a model is loaded.
"""
