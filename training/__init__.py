"""Training for the BLIP family: the objectives that produce the encoders the engine loads.

    config.py       dataclass configs, presets, YAML/JSON files
    data.py         image-caption pairs (LAVIS/Karpathy JSON, caption folders), batches, resumable order
    tokenizer.py    BLIP's [DEC]/[ENC] tokens; word-level vocabularies for synthetic data
    model.py        BLIP from transformers' modules: ViT, text encoder/decoder sharing, momentum, queues
    objectives.py   every loss (ITC, ITM, LM); objectives return dicts of named losses
    distributed.py  torchrun/DDP setup, gathers for contrastive losses
    loop.py         the training loop: AdamW + cosine, bf16 autocast, accumulation, logs, checkpoints
    checkpoint.py   exact resume
    export.py       to/from Hugging Face BlipForImageTextRetrieval / BlipForConditionalGeneration
    capfilt.py      captioning + ITM filtering of a dataset
    cli.py          click commands: train, capfilt, export

An optional part of blipsearch: the engine (`retrieval`, `indexer`) never imports it.
"""
