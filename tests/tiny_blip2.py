"""Tiny random BLIP-2 retrieval checkpoints for tests: saved as transformers 5 writes them, loaded by path."""

from __future__ import annotations

from pathlib import Path

from tiny import save_tokenizer


def tiny_blip2_config(vocab_size: int, image_token_index: int | None, num_query_tokens: int = 8,
                      image_size: int = 32, patch_size: int = 8, cross_attention_frequency: int = 2):
    """ViT and Q-Former 32 wide, 2 layers each; with frequency 2, layer 0 cross-attends and layer 1 does not."""
    from transformers import Blip2Config

    # initializer_range 0.2: with BLIP-2's defaults (ViT 1e-10, Q-Former 0.02) every image would look the same
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=patch_size, initializer_range=0.2)
    qformer = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=64, use_qformer_text_input=True,
                   cross_attention_frequency=cross_attention_frequency, initializer_range=0.2)
    text = dict(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                word_embed_proj_dim=16)  # the OPT language model: unused by retrieval, kept small
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                       num_query_tokens=num_query_tokens, image_text_hidden_size=16,
                       image_token_index=image_token_index, initializer_range=0.2)


def save_tiny_blip2(directory: Path, seed: int = 0, num_query_tokens: int = 8, image_size: int = 32,
                    patch_size: int = 8, cross_attention_frequency: int = 2, image_token: bool = True,
                    model_class: str = "Blip2ForImageTextRetrieval") -> Path:
    """A random checkpoint + Blip2Processor (BERT word tokenizer with [DEC] as bos, `<image>` added by the
    processor). `image_token` saves what the hub's newer revisions hold: a processor that prepends one
    `<image>` per query and a config whose `image_token_index` makes the model strip them (the id lies
    outside the Q-Former's vocabulary, as 30523 does in Salesforce/blip2-itm-vit-g); without it, the older
    revisions: neither."""
    import torch
    import transformers

    tokenizer, vocab_size = save_tokenizer(directory, with_enc=False)
    processor = transformers.Blip2Processor(
        transformers.BlipImageProcessorPil(size={"height": image_size, "width": image_size}), tokenizer,
        num_query_tokens=num_query_tokens if image_token else None)
    processor.save_pretrained(directory)
    image_token_index = tokenizer.convert_tokens_to_ids("<image>") if image_token else None
    config = tiny_blip2_config(vocab_size, image_token_index, num_query_tokens, image_size, patch_size,
                               cross_attention_frequency)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # transformers zeroes the query tokens at initialisation: give them trained-like values
        model.query_tokens.normal_(0, 1)
    model.save_pretrained(directory)
    return directory
