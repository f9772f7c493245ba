"""Image-text retrieval with the BLIP family: model adapters, the two-stage searcher and the CLI.

Importing this package is cheap; torch and transformers load only when a model is loaded.
"""

DEFAULT_MODEL = "Salesforce/blip-itm-base-coco"  # here, not in models/, so that `--help` needs no torch
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"  # `index --captions` without --captioner
