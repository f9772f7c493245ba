"""BLIP's captioner prompt ("a picture of "): it starts every caption, the LM loss never predicts it, and the
exported captioner generates after it and cuts it off again."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from blipsearch.training.capfilt import Captioner
from blipsearch.training.loop import train
from blipsearch.training.objectives import caption_loss, with_prompt

from test_training_loop import scenes, tiny_config
from test_training_model import batch_of, tiny

pytestmark = pytest.mark.usefixtures("training_threads")  # its training run's config sets threads=1

CLS, SEP, PAD = 2, 3, 0


def test_the_prompt_follows_the_first_token_and_is_masked_from_the_labels():
    ids = torch.tensor([[CLS, 11, 12, SEP, PAD]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    prompted, prompted_mask, labels = with_prompt(ids, mask, (7, 8))
    assert prompted.tolist() == [[CLS, 7, 8, 11, 12, SEP, PAD]]
    assert prompted_mask.tolist() == [[1, 1, 1, 1, 1, 1, 0]]
    assert labels[:, 1:].tolist() == [[-100, -100, 11, 12, SEP, -100]]  # targets after the shift
    unchanged, _, plain = with_prompt(ids, mask, ())
    assert torch.equal(unchanged, ids) and plain[:, 1:].tolist() == [[11, 12, SEP, -100]]


def opt_like_tokenizer(texts: list[str]):
    """A byte-level BPE as OPT's: no prefix space, its BOS (`</s>`) put first."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts * 20, vocab_size=300, special_tokens=["<pad>", "</s>"])
    bpe._tokenizer.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>")


def test_a_bpe_lm_learns_the_caption_as_it_reads_after_the_prompt_as_lavis_tokenises_them():
    """Tokenised alone, a caption's first word lost its leading space ("a picture ofa red circle")."""
    from blipsearch.retrieval.errors import InvalidInputError
    from blipsearch.training.data import Collate
    from blipsearch.training.families import lm_prompt

    captions = ["a red circle", "two blue squares above a circle"]
    tokenizer = opt_like_tokenizer([*captions, "a picture of"])
    prompt = lm_prompt(tokenizer, "a picture of ", encoder_text=False)  # a trailing space is no token of its own
    tokens = Collate(tokenizer, 35, prompt=("a picture of", prompt)).after_prompt(captions)
    ids, mask, _ = with_prompt(tokens["input_ids"], tokens["attention_mask"], prompt)
    lavis = tokenizer([f"a picture of {c}" for c in captions], padding="longest", return_tensors="pt")
    assert torch.equal(ids, lavis["input_ids"]) and torch.equal(mask, lavis["attention_mask"])
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "a picture of a red circle"
    alone = Collate(tokenizer, 35).tokenize(captions)  # the caption tokenised alone, as it was
    spliced = with_prompt(alone["input_ids"], alone["attention_mask"], prompt)[0]
    assert tokenizer.decode(spliced[0], skip_special_tokens=True) == "a picture ofa red circle"
    with pytest.raises(InvalidInputError, match="tokenises differently before a caption"):  # tokens not its own
        Collate(tokenizer, 35, prompt=("a picture of", (*prompt[:-1], 299))).after_prompt(captions)


def test_caption_loss_predicts_the_caption_after_the_prompt_only():
    model, tokenizer, _ = tiny()
    model.eval()
    prompt = tuple(tokenizer("a red", add_special_tokens=False)["input_ids"])
    model.ids = dataclasses.replace(model.ids, prompt=prompt)
    batch = batch_of(tokenizer)
    embeds, _ = model.encode_image(batch.pixel_values)
    with torch.no_grad():
        ours = caption_loss(model, batch.input_ids, batch.attention_mask, embeds, smoothing=0.1)
        # by hand: [DEC] prompt caption, every caption token (and [SEP]) predicted from the ones before it
        rows, count = batch.input_ids.shape[0], len(prompt)
        ids = torch.cat([batch.input_ids[:, :1], torch.tensor(prompt).expand(rows, count), batch.input_ids[:, 1:]], 1)
        mask = torch.cat([batch.attention_mask[:, :1], torch.ones(rows, count, dtype=torch.long),
                          batch.attention_mask[:, 1:]], 1)
        logits = model.lm_logits(ids, mask, embeds)
        targets = ids.clone()
        targets[mask == 0] = -100
        targets[:, :1 + count] = -100  # BLIP: decoder_targets[:, :prompt_length] = -100
        ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1),
                              ignore_index=-100, label_smoothing=0.1)
    torch.testing.assert_close(ours, ref)


def test_an_unknown_prompt_word_is_refused():
    from blipsearch.retrieval.errors import InvalidInputError
    from blipsearch.training.tokenizer import special_ids

    _, tokenizer, _ = tiny()
    with pytest.raises(InvalidInputError, match="caption_prompt"):
        special_ids(tokenizer, prompt="a zebra of")


def test_the_exported_captioner_writes_after_its_prompt_and_cuts_it_off(tmp_path):
    scenes().write_dataset(tmp_path / "data", seed=2, size=64, sizes={"train": 16, "val": 4, "test": 4})
    run = train(tiny_config(tmp_path / "data", tmp_path / "run", "optim.max_steps=2",
                            "objective.caption_prompt=a picture of "))
    captioner = Captioner(str(run / "captioner"), torch.device("cpu"))
    assert captioner.prompt == "a picture of"
    raw = []
    real_decode = captioner.tokenizer.batch_decode
    captioner.tokenizer.batch_decode = lambda out, **kw: raw.extend(real_decode(out, **kw)) or raw[-len(out):]
    from blipsearch.indexer.images import load_image

    image = next((tmp_path / "data" / "images" / "test").glob("*.png"))
    captions = captioner.caption([load_image(image, captioner.preprocessing).pixels], samples=3)
    assert len(captions[0]) == 3 and all(text.startswith("a picture of") for text in raw)
    assert captions[0] == [text[len("a picture of"):].strip() for text in raw]
