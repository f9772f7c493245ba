"""BLIP-2 stage 1 for training: a Q-Former on a frozen image encoder, built from transformers' BLIP-2 modules
so that export is a state-dict mapping onto `Blip2ForImageTextRetrieval`.

    vision_model       Blip2VisionModel, frozen (vision.py): (B, 3, H, W) -> (B, T, Hv) tokens, no autograd
    query_tokens       (1, Q, H) learned queries
    embeddings         Blip2TextEmbeddings: word + position embeddings of the text
    qformer            Blip2QFormerModel: a BERT whose layers 0, f, 2f, ... also cross-attend the image tokens
                       (queries only); queries and text share self-attention, each has its own feed-forward
                       block (`*_query` for the queries, initialised from the text's, as LAVIS)
    vision_projection, text_projection, itm_head     the retrieval heads
    lm_head            ITG's prediction head (BERT's `cls.predictions`), decoder tied to the word embeddings;
                       not exported (transformers has no BLIP-2 class that holds it)
    temp               ITC temperature

One Q-Former serves four passes (Q queries, L text tokens):

    queries       (B, Q)       cross-attend the image                       -> Q vectors per image (ITC)
    text          (B, L)       bidirectional, no image                      -> [CLS] vector (ITC)
    joint         (3B, Q + L)  bidirectional over queries and text          -> ITM logits averaged over the queries
    generation    (B, Q + L)   queries see the queries; text sees the       -> next-token logits of the text (ITG)
                               queries and the earlier text (UniLM mask)

LAVIS runs the generation pass on the query pass's cached keys and values; a joint pass under the UniLM mask
gives the same numbers (the queries never see the text) at the cost of recomputing the queries.
Attribute names equal `Blip2ForImageTextRetrieval`'s; the losses live in `objectives`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from blipsearch.retrieval.errors import ModelLoadError

from .config import ModelConfig
from .export import checkpoint_dir, load_pretrained
from .tokenizer import SpecialIds
from .vision import frozen_vision_model, image_tokens, random_vision_config, read_vision_tower

log = logging.getLogger(__name__)

def blip2_config(cfg: ModelConfig, ids: SpecialIds, vision_config):
    """The Hugging Face `Blip2Config` for our Q-Former sizes, vocabulary and image encoder."""
    from transformers import Blip2Config

    qformer = dict(vocab_size=ids.vocab_size, hidden_size=cfg.text_width, intermediate_size=cfg.text_mlp,
                   num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                   max_position_embeddings=cfg.max_positions, pad_token_id=ids.pad,
                   cross_attention_frequency=cfg.cross_attention_frequency, use_qformer_text_input=True,
                   hidden_dropout_prob=cfg.text_dropout, attention_probs_dropout_prob=cfg.text_dropout)
    return Blip2Config(vision_config=vision_config.to_dict(), qformer_config=qformer,
                       num_query_tokens=cfg.num_query_tokens, image_text_hidden_size=cfg.embed_dim)


class LMHead(nn.Module):
    """BERT's `cls.predictions`: dense + activation + LayerNorm, then the (tied) vocabulary projection."""

    def __init__(self, qformer_config, word_embeddings: nn.Embedding):
        super().__init__()
        from transformers.activations import ACT2FN

        hidden = qformer_config.hidden_size
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(hidden, hidden)
        self.transform.LayerNorm = nn.LayerNorm(hidden, eps=qformer_config.layer_norm_eps)
        self.activation = ACT2FN[qformer_config.hidden_act]
        self.decoder = nn.Linear(hidden, qformer_config.vocab_size)
        self.decoder.weight = word_embeddings.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        t = self.transform
        return self.decoder(t.LayerNorm(self.activation(t.dense(hidden))))


def unilm_visibility(queries: int):
    """transformers' mask function (batch, head, row, key index tensors) -> may the row attend the key:
    every row sees the queries; text rows also see the earlier text and themselves."""
    def visible(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx < queries) | ((q_idx >= queries) & (kv_idx <= q_idx))
    return visible


class Blip2PretrainModel(nn.Module):
    """Features for BLIP-2's stage-1 ITC, ITM and ITG objectives."""

    def __init__(self, config, ids: SpecialIds, temperature: float, with_lm_head: bool, train_vision_norm: bool,
                 vision_state: dict[str, torch.Tensor] | None = None):
        super().__init__()
        from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings

        q = config.qformer_config
        self.config, self.ids = config, ids
        self.vision_model = frozen_vision_model(config.vision_config, vision_state, train_vision_norm)
        self.query_tokens = nn.Parameter(torch.empty(1, config.num_query_tokens, q.hidden_size))
        self.embeddings = Blip2TextEmbeddings(q)
        self.qformer = Blip2QFormerModel(q)
        self.vision_projection = nn.Linear(q.hidden_size, config.image_text_hidden_size)
        self.text_projection = nn.Linear(q.hidden_size, config.image_text_hidden_size)
        self.itm_head = nn.Linear(q.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(float(temperature)))
        self.lm_head = LMHead(q, self.embeddings.word_embeddings) if with_lm_head else None
        self._init_weights(q.initializer_range)
        self.copy_text_ffn_to_queries()

    def _init_weights(self, std: float) -> None:
        """BERT's initialisation for what transformers' `post_init` does not reach here (plain modules)."""
        with torch.no_grad():
            self.query_tokens.normal_(0.0, std)  # LAVIS; transformers zeroes them for loading
            for module in (self.embeddings, self.vision_projection, self.text_projection, self.itm_head,
                           *([self.lm_head] if self.lm_head is not None else [])):
                for m in module.modules():
                    if isinstance(m, (nn.Linear, nn.Embedding)):  # the LM head's decoder: the embeddings again
                        m.weight.normal_(0.0, std)
                    if isinstance(m, nn.Linear) and m.bias is not None:
                        m.bias.zero_()
                    if isinstance(m, nn.LayerNorm):
                        m.weight.fill_(1.0)
                        m.bias.zero_()
            padding = self.embeddings.word_embeddings.padding_idx
            if padding is not None:
                self.embeddings.word_embeddings.weight[padding].zero_()

    def copy_text_ffn_to_queries(self) -> None:
        """`intermediate_query` / `output_query` := the text's feed-forward weights (copies, not shared)."""
        with torch.no_grad():
            for layer in self.qformer.encoder.layer:
                layer.intermediate_query.load_state_dict(layer.intermediate.state_dict())
                layer.output_query.load_state_dict(layer.output.state_dict())

    def train(self, mode: bool = True) -> Blip2PretrainModel:
        super().train(mode)
        self.vision_model.eval()  # frozen: never in training mode (LAVIS's `disabled_train`)
        return self

    # --- features -----------------------------------------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> frozen ViT tokens (B, T, Hv) and normalised query vectors (B, Q, D)."""
        embeds = image_tokens(self.vision_model, pixel_values)
        queries = self.query_tokens.expand(embeds.shape[0], -1, -1)
        hidden = self.qformer(query_embeds=queries, encoder_hidden_states=embeds).last_hidden_state  # (B, Q, H)
        return embeds, F.normalize(self.vision_projection(hidden).float(), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) with [CLS] first -> normalised ITC vectors (B, D) of the text-only pass."""
        hidden = self.qformer(query_embeds=self.embeddings(input_ids=input_ids), query_length=0,
                              attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.text_projection(hidden[:, 0, :]).float(), dim=-1)

    def _joint(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor,
               causal_text: bool) -> torch.Tensor:
        """Queries + text in one sequence -> last hidden states (N, Q + L, H); queries cross-attend the image."""
        n, q = input_ids.shape[0], self.config.num_query_tokens
        embeds = self.embeddings(input_ids=input_ids, query_embeds=self.query_tokens.expand(n, -1, -1))
        mask = torch.cat([attention_mask.new_ones(n, q), attention_mask], dim=1)  # (N, Q + L)
        if causal_text:
            from transformers.masking_utils import create_bidirectional_mask

            mask = create_bidirectional_mask(self.qformer.config, embeds, mask, and_mask_function=unilm_visibility(q))
        return self.qformer(query_embeds=embeds, query_length=q, attention_mask=mask,
                            encoder_hidden_states=image_embeds).last_hidden_state

    def itm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_embeds: torch.Tensor) -> torch.Tensor:
        """(N, L) with [CLS] first (BLIP-2 has no [ENC]), (N, T, Hv) -> (N, 2) logits averaged over the queries."""
        hidden = self._joint(input_ids, attention_mask, image_embeds, causal_text=False)
        return self.itm_head(hidden[:, :self.config.num_query_tokens]).float().mean(dim=1)

    def lm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  image_embeds: torch.Tensor) -> torch.Tensor:
        """[DEC] replacing [CLS]: (B, L) -> (B, L, vocab) next-token logits under the UniLM mask."""
        if self.lm_head is None:
            raise RuntimeError("this model was built without an LM head (objective.losses has no 'itg')")
        input_ids = input_ids.clone()
        input_ids[:, 0] = self.ids.bos
        hidden = self._joint(input_ids, attention_mask, image_embeds, causal_text=True)
        return self.lm_head(hidden[:, self.config.num_query_tokens:]).float()


def bert_to_qformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BERT (`BertForMaskedLM`/`BertModel`) state dict under our names: the embeddings and their LayerNorm,
    each layer's self-attention and text feed-forward block, the MLM head's transform and bias. BERT has no
    cross-attention: those layers start random, as in LAVIS; the queries' blocks are copied afterwards."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("bert.")
        if key.startswith("cls.predictions.transform."):
            out["lm_head." + key.removeprefix("cls.predictions.")] = value
        elif key == "cls.predictions.bias":
            out["lm_head.decoder.bias"] = value
        else:
            out.update(_bert_module(key, value))
    return out


def blip_text_to_qformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BLIP retrieval checkpoint's text side under our names: its text encoder as `bert_to_qformer` maps
    BERT, and besides its cross-attention (trained to read that checkpoint's ViT tokens) and its ITC text
    projection. Its ITM head is left out: BLIP's reads the [ENC] token, ours the average of the queries."""
    out = {}
    for key, value in state.items():
        if key.startswith("text_encoder."):
            out.update(_bert_module(key.removeprefix("text_encoder."), value))
        elif key.startswith("text_proj."):
            out["text_projection." + key.removeprefix("text_proj.")] = value
    return out


def _bert_module(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One tensor of a BERT encoder (`embeddings.*`, `encoder.layer.*`) under the Q-Former's name; {} else."""
    if key.startswith("embeddings.LayerNorm."):
        return {"qformer.layernorm." + key.split(".")[-1]: value}
    if key.startswith(("embeddings.word_embeddings.", "embeddings.position_embeddings.")):
        return {key: value}
    if key.startswith("encoder.layer."):
        key = key.replace(".attention.self.", ".attention.attention.")
        return {"qformer." + key.replace(".crossattention.self.", ".crossattention.attention."): value}
    return {}


def load_bert(model: Blip2PretrainModel, name: str, tokenizer=None) -> list[str]:
    """Initialise the Q-Former from a BERT checkpoint (LAVIS: bert-base-uncased) or from a BLIP retrieval
    checkpoint's text encoder (`blip_text_to_qformer`), then copy the text feed-forward blocks to the queries'.
    Word rows follow the tokens: with `tokenizer` and a BLIP checkpoint (whose folder holds its tokenizer)
    each of our tokens takes the row of the same token there; BERT's rows are taken by position, as its
    vocabulary comes first in ours. Tokens the source lacks (BERT's [DEC] and [ENC], new words) keep
    their random rows."""
    import transformers

    from blipsearch.retrieval.models.loading import read_config

    directory = checkpoint_dir(name)
    checkpoint = read_config(directory, name)
    model_type = checkpoint.get("model_type")
    if model_type == "blip":
        if "BlipForImageTextRetrieval" not in checkpoint.get("architectures", []):
            raise ModelLoadError(f"model.qformer_from {name} is not a BLIP retrieval checkpoint "
                                 f"({', '.join(checkpoint.get('architectures', [])) or 'no architecture named'}): "
                                 "only a retrieval checkpoint has the text encoder the Q-Former starts from")
        if tokenizer is None:
            raise ModelLoadError("a BLIP checkpoint as model.qformer_from needs our tokenizer to match word rows")
        from .tokenizer import load_tokenizer

        source = load_pretrained(transformers.BlipForImageTextRetrieval, directory, name)
        mapped = blip_text_to_qformer(source.state_dict())
        mapped["embeddings.word_embeddings.weight"] = _rows_by_token(
            mapped["embeddings.word_embeddings.weight"], load_tokenizer(str(directory)).get_vocab(),
            tokenizer.get_vocab(), model.embeddings.word_embeddings.weight.detach())
    elif model_type in ("bert", None):
        mapped = bert_to_qformer(load_pretrained(transformers.BertForMaskedLM, directory, name).state_dict())
    else:
        raise ModelLoadError(f"model.qformer_from {name} is a {model_type} checkpoint; give a BERT checkpoint or "
                             "a BLIP retrieval checkpoint")
    ours, usable, skipped = model.state_dict(), {}, []
    for key, value in mapped.items():
        target = ours.get(key)
        if target is None or value.shape[1:] != target.shape[1:] or value.shape[0] > target.shape[0]:
            skipped.append(key)
            continue
        usable[key] = torch.cat([value, target[value.shape[0]:]]) if value.ndim else value
    if not usable:  # another width altogether: nothing would start from it
        raise ModelLoadError(f"model.qformer_from {name} has no tensor of this Q-Former's shapes (it is "
                             f"{model.config.qformer_config.hidden_size} wide); give a checkpoint of that width, "
                             "or set the model's sizes (model.preset) to the checkpoint's")
    if skipped:
        log.warning("model.qformer_from %s: %d tensors of other shapes or without a place here stay random: %s",
                    name, len(skipped), ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    model.load_state_dict(usable, strict=False)
    model.copy_text_ffn_to_queries()
    crossed = any(".crossattention." in key for key in usable)
    log.info("Q-Former initialised from %s: %d tensors (cross-attention %s)", name, len(usable),
             "included" if crossed else "starts random")
    return sorted(usable)


def _rows_by_token(theirs: torch.Tensor, their_vocab: dict[str, int], our_vocab: dict[str, int],
                   ours: torch.Tensor) -> torch.Tensor:
    """Our word embedding with each token's row taken from theirs where they have the token (theirs as it is
    where its width differs: skipped with the other tensors of other shapes)."""
    if theirs.shape[1:] != ours.shape[1:]:
        return theirs
    out = ours.clone()
    for token, i in our_vocab.items():
        j = their_vocab.get(token)
        if j is not None and i < out.shape[0] and j < theirs.shape[0]:
            out[i] = theirs[j]
    return out


def build_blip2_model(cfg: ModelConfig, temperature: float, with_lm_head: bool, ids: SpecialIds,
                      config=None, tokenizer=None) -> Blip2PretrainModel:
    """A Q-Former with random (or BERT) weights on the frozen ViT of `cfg.vision_from` (None: a random ViT);
    `config` (a Blip2Config, from `init_from`) wins over `cfg`'s sizes when given."""
    state = None
    if config is None:
        if cfg.vision_from:
            vision_config, state = read_vision_tower(cfg.vision_from)
        else:
            vision_config = random_vision_config(cfg)
            log.warning("the frozen image encoder is a random ViT (set model.vision_from): fine for tests only")
        config = blip2_config(cfg, ids, vision_config)
    config.qformer_config.use_qformer_text_input = True  # the text passes need the text feed-forward blocks
    model = Blip2PretrainModel(config, ids, temperature, with_lm_head, cfg.train_vision_norm, state)
    if cfg.qformer_from:
        load_bert(model, cfg.qformer_from, tokenizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.vision_model.parameters() if not p.requires_grad)
    log.info("BLIP-2: Q-Former with %.1fM trainable parameters on a frozen %.1fM-parameter ViT",
             trainable / 1e6, frozen / 1e6)
    return model
