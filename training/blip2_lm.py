"""BLIP-2 stage 2 for training: the Q-Former's query outputs, projected to the width of a frozen language model,
prefixed to its input as a soft prompt (LAVIS `blip2_opt.py`, `blip2_t5.py`). Built from transformers' modules
under the names of `Blip2ForConditionalGeneration`, so that export is a state-dict copy.

    vision_model         Blip2VisionModel, frozen (vision.py)
    query_tokens         (1, Q, H) learned queries
    qformer              Blip2QFormerModel without text input: the queries cross-attend the image tokens
    language_projection  Linear(H -> the LM's width)
    language_model       the LM, frozen, in eval mode: decoder-only (`AutoModelForCausalLM`, e.g. OPT) or
                         encoder-decoder (`AutoModelForSeq2SeqLM`, e.g. T5)

A decoder-only LM reads [Q projected queries] [BOS] prompt text, the sequence that transformers builds from Q
`<image>` placeholders followed by the tokenised text (`Blip2Processor` with `num_query_tokens`), and predicts
the text after the prompt. An encoder-decoder LM reads [queries] + the text's first part in its encoder and
predicts the rest with its decoder (a prefix LM; see `objectives.Blip2LMObjective`). Only the queries, the
Q-Former and the projection train.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .vision import frozen_vision_model, image_tokens

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"  # the placeholder transformers replaces with the projected queries
Instruction = tuple[torch.Tensor, torch.Tensor] | None  # InstructBLIP: (B, Li) Q-Former token ids, their mask


class Blip2LMModel(nn.Module):
    """BLIP-2 with a frozen language model: `lm_logits` / `seq2seq_logits` for the stage-2 LM loss, `greedy` for
    decoding. `InstructBlipLMModel` adds the instruction to the Q-Former; every method takes it as
    `instruction` (Q-Former token ids and mask), None here."""

    def __init__(self, config, language_model: nn.Module, vision_state: dict[str, torch.Tensor] | None = None):
        super().__init__()
        q = config.qformer_config
        self.config = config
        self.vision_model = frozen_vision_model(config.vision_config, vision_state)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, q.hidden_size))
        self.qformer = self._qformer(q)
        self.language_projection = nn.Linear(q.hidden_size, config.text_config.hidden_size)
        self.language_model = language_model.requires_grad_(False).eval()
        with torch.no_grad():
            self.query_tokens.normal_(0.0, q.initializer_range)
            self.language_projection.weight.normal_(0.0, q.initializer_range)
            self.language_projection.bias.zero_()

    def _qformer(self, qformer_config) -> nn.Module:
        from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel

        return Blip2QFormerModel(qformer_config)

    def train(self, mode: bool = True) -> Blip2LMModel:
        super().train(mode)
        self.vision_model.eval()  # frozen parts never train: no dropout in them
        self.language_model.eval()
        return self

    def soft_prompt(self, pixel_values: torch.Tensor, instruction: Instruction = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, Q, H_lm): the projected query outputs."""
        if instruction is not None:
            raise ValueError("BLIP-2's Q-Former reads no instruction (InstructBLIP's does)")
        embeds = image_tokens(self.vision_model, pixel_values)
        queries = self.query_tokens.expand(embeds.shape[0], -1, -1)
        hidden = self.qformer(query_embeds=queries, encoder_hidden_states=embeds).last_hidden_state  # (B, Q, H)
        return self.language_projection(hidden)

    def lm_logits(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  instruction: Instruction = None) -> torch.Tensor:
        """(B, L) LM tokens ([BOS] prompt text [PAD]...) -> (B, Q + L, vocab) next-token logits of the whole
        sequence, the soft prompt first."""
        embeds, mask = self._inputs(pixel_values, input_ids, attention_mask, instruction)
        return self.language_model(inputs_embeds=embeds, attention_mask=mask).logits.float()

    def seq2seq_logits(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       labels: torch.Tensor, instruction: Instruction = None) -> torch.Tensor:
        """Encoder-decoder LM: (B, L) encoder text after the soft prompt, (B, T) target tokens (-100 ignored) ->
        (B, T, vocab) decoder logits (the decoder reads the targets shifted right, after its start token)."""
        embeds, mask = self._inputs(pixel_values, input_ids, attention_mask, instruction)
        return self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels).logits.float()

    def _inputs(self, pixel_values, input_ids, attention_mask, instruction: Instruction):
        """The LM's (decoder-only) or its encoder's (encoder-decoder) input: the soft prompt, then the text."""
        prefix = self.soft_prompt(pixel_values, instruction)
        text = self.language_model.get_input_embeddings()(input_ids)
        return (torch.cat([prefix.to(text.dtype), text], dim=1),
                torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1))

    @torch.no_grad()
    def greedy(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, max_new_tokens: int,
               instruction: Instruction = None) -> torch.Tensor:
        """Greedy decoding (B, max_new_tokens) after `input_ids` (B, L, no padding: [BOS] prompt for a
        decoder-only LM, the encoder's text for an encoder-decoder one), each step a full forward without a
        cache: the reference that an export's `generate` is tested against."""
        if not self.config.use_decoder_only_language_model:
            return self._greedy_seq2seq(pixel_values, input_ids, max_new_tokens, instruction)
        out = input_ids
        for _ in range(max_new_tokens):
            logits = self.lm_logits(pixel_values, out, torch.ones_like(out), instruction)
            out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return out[:, input_ids.shape[1]:]

    def _greedy_seq2seq(self, pixel_values, input_ids, max_new_tokens: int, instruction: Instruction):
        embeds, mask = self._inputs(pixel_values, input_ids, torch.ones_like(input_ids), instruction)
        lm = self.language_model
        encoded = lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
        out = torch.full((len(input_ids), 1), lm.config.decoder_start_token_id, dtype=torch.long)
        for _ in range(max_new_tokens):
            logits = lm(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=out).logits
            out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return out[:, 1:]


class InstructBlipLMModel(Blip2LMModel):
    """InstructBLIP: the instruction's tokens enter the Q-Former beside the queries (one self-attention over
    both; only the queries cross-attend the image), so the visual features depend on what is asked. Names
    of `InstructBlipForConditionalGeneration` (the Q-Former holds its own text embeddings)."""

    def _qformer(self, qformer_config) -> nn.Module:
        from transformers.models.instructblip.modeling_instructblip import InstructBlipQFormerModel

        return InstructBlipQFormerModel(qformer_config)

    def soft_prompt(self, pixel_values: torch.Tensor, instruction: Instruction = None) -> torch.Tensor:
        if instruction is None:
            raise ValueError("InstructBLIP's Q-Former needs the instruction (Q-Former token ids and mask)")
        ids, mask = instruction
        embeds = image_tokens(self.vision_model, pixel_values)
        queries = self.query_tokens.expand(embeds.shape[0], -1, -1)
        mask = torch.cat([mask.new_ones(queries.shape[:2]), mask], dim=1)
        hidden = self.qformer(input_ids=ids, attention_mask=mask, query_embeds=queries,
                              encoder_hidden_states=embeds).last_hidden_state
        return self.language_projection(hidden[:, :queries.shape[1]])  # (B, Q, H_lm): the queries' outputs


def stage2_config(stage1_config, language_model_config, num_query_tokens: int | None = None):
    """The `Blip2Config` of stage 2: stage 1's ViT and Q-Former (without its text input), the LM's config."""
    from transformers import Blip2Config

    qformer = stage1_config.qformer_config.to_dict()
    qformer["use_qformer_text_input"] = False
    return Blip2Config(vision_config=stage1_config.vision_config.to_dict(), qformer_config=qformer,
                       text_config=language_model_config.to_dict(),
                       num_query_tokens=num_query_tokens or stage1_config.num_query_tokens)


def instructblip_config(stage1_config, language_model_config, num_query_tokens: int | None = None):
    """The `InstructBlipConfig`: stage 1's ViT and Q-Former, the LM's config."""
    from transformers import InstructBlipConfig

    qformer = {k: v for k, v in stage1_config.qformer_config.to_dict().items()
               if k not in ("model_type", "use_qformer_text_input")}
    return InstructBlipConfig(vision_config=stage1_config.vision_config.to_dict(), qformer_config=qformer,
                              text_config=language_model_config.to_dict(),
                              num_query_tokens=num_query_tokens or stage1_config.num_query_tokens)


# stage-1 (`Blip2ForImageTextRetrieval`) names -> InstructBLIP's, whose Q-Former holds its text embeddings
_TO_INSTRUCTBLIP = (("embeddings.", "qformer.embeddings."), ("qformer.layernorm.", "qformer.embeddings.layernorm."))


def build_blip2_lm(stage1_config, stage1_state: dict[str, torch.Tensor], language_model: nn.Module,
                   instruct: bool = False) -> Blip2LMModel:
    """Stage 2 (or InstructBLIP, `instruct`) from a stage-1 checkpoint (`Blip2ForImageTextRetrieval` tensors:
    ViT, queries, Q-Former and its text embeddings) and an LM; the projection starts random."""
    if instruct:
        config, cls = instructblip_config(stage1_config, language_model.config), InstructBlipLMModel
        state = {next((new + k[len(old):] for old, new in _TO_INSTRUCTBLIP if k.startswith(old)), k): v
                 for k, v in stage1_state.items()}
    else:
        config, cls, state = stage2_config(stage1_config, language_model.config), Blip2LMModel, stage1_state
    vision = {k.removeprefix("vision_model."): v.float() for k, v in state.items() if k.startswith("vision_model.")}
    model = cls(config, language_model, vision or None)
    ours = model.state_dict()
    usable = {k: v for k, v in state.items()
              if k.startswith(("query_tokens", "qformer.")) and k in ours and ours[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    log.info("%s: %d Q-Former tensors from stage 1; %.1fM trainable parameters on a frozen %.1fM-parameter LM",
             "InstructBLIP" if instruct else "stage 2", len(usable),
             sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
             sum(p.numel() for p in language_model.parameters()) / 1e6)
    return model


def add_image_token(tokenizer, language_model: nn.Module) -> int:
    """Give the LM's vocabulary the `<image>` placeholder (a row of its own) before training, so that the
    softmax that training sees is the one the export computes. Returns its id."""
    import transformers

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([transformers.AddedToken(IMAGE_TOKEN, normalized=False, special=True)],
                             special_tokens=True)
    if len(tokenizer) > language_model.get_input_embeddings().num_embeddings:
        with torch.random.fork_rng():  # the new row: the same on every rank and in every run; the run's seed
            torch.manual_seed(0)       # governs everything else
            language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def export_blip2_lm(model: Blip2LMModel, tokenizer, out, image_size: int, qformer_tokenizer=None):
    """`Blip2ForConditionalGeneration` + `Blip2Processor` (the LM's tokenizer, which holds `<image>`, and
    `num_query_tokens`), or for InstructBLIP `InstructBlipForConditionalGeneration` + `InstructBlipProcessor`
    (with the Q-Former's tokenizer too): transformers' `generate` reads the same sequence as training."""
    import copy
    from pathlib import Path

    import transformers

    from blipsearch.retrieval.models.preprocessing import BLIP_MEAN, BLIP_STD

    instruct = isinstance(model, InstructBlipLMModel)
    out = Path(out)
    config = copy.deepcopy(model.config)
    config.text_config = copy.deepcopy(model.language_model.config)  # its vocabulary holds <image>
    config.image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config.caption_prompt = getattr(model, "caption_instruction", None) if instruct else \
        tokenizer.decode(list(getattr(model, "prompt", ())), skip_special_tokens=True)
    hf = (transformers.InstructBlipForConditionalGeneration if instruct else
          transformers.Blip2ForConditionalGeneration)(config)
    result = hf.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"export to {type(hf).__name__} does not map cleanly: missing "
                           f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    hf.save_pretrained(out)
    images = transformers.BlipImageProcessorPil(size={"height": image_size, "width": image_size},
                                                image_mean=BLIP_MEAN, image_std=BLIP_STD)
    if instruct:
        processor = transformers.InstructBlipProcessor(images, tokenizer, qformer_tokenizer,
                                                       num_query_tokens=config.num_query_tokens)
    else:
        processor = transformers.Blip2Processor(images, tokenizer, num_query_tokens=config.num_query_tokens)
    processor.save_pretrained(out)
    log.info("exported %s to %s", type(hf).__name__, out)
    return out
