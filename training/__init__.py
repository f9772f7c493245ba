"""Training for the BLIP family (BLIP; BLIP-2 stage 1): the objectives that produce the encoders the engine loads.

    config.py       dataclass configs, presets, YAML/JSON files
    data.py         image-caption pairs (LAVIS/Karpathy JSON, caption folders), batches, resumable order
    tokenizer.py    BLIP's [DEC]/[ENC] tokens; word-level vocabularies for synthetic data
    model.py        BLIP from transformers' modules: ViT, text encoder/decoder sharing, momentum, queues
    blip2.py        BLIP-2 stage 1: Q-Former (32 learned queries) on a frozen image encoder
    vision.py       the frozen image encoder: a BLIP or BLIP-2 checkpoint's ViT
    families.py     per family: build, read a checkpoint, load weights, export (the loop never branches)
    objectives.py   every loss (BLIP: ITC, ITM, LM; BLIP-2: ITC, ITM, ITG); objectives return dicts of losses
    distributed.py  torchrun/DDP setup, gathers for contrastive losses
    loop.py         the training loop: AdamW + cosine, bf16 autocast, accumulation, logs, checkpoints
    checkpoint.py   exact resume
    export.py       to/from Hugging Face BlipForImageTextRetrieval / BlipForConditionalGeneration /
                    Blip2ForImageTextRetrieval
    capfilt.py      captioning + ITM filtering of a dataset
    cli.py          click commands: train, capfilt, export

An optional part of blipsearch: the engine (`retrieval`, `indexer`) never imports it.
"""
