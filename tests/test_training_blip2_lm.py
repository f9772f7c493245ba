"""BLIP-2 stage 2: queries, Q-Former and projection train on a frozen LM (a decoder-only OPT, an encoder-decoder
T5); the export is a `Blip2ForConditionalGeneration` whose loss and `generate` equal the training model's."""

from pathlib import Path

import pytest
import torch
from resume import assert_resume_is_exact

from blipsearch.training.config import load_config
from blipsearch.training.loop import prepare_model, run_steps, setup, wrap
from blipsearch.training.objectives import Batch, Blip2LMObjective, Progress, with_prompt

from test_training_loop import scenes
from tiny import SPECIALS, save_tokenizer
from tiny_blip2 import save_tiny_blip2

pytestmark = pytest.mark.usefixtures("training_threads")  # its runs' configs set threads=1 (stage2_config)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a picture of"


def save_tiny_opt(directory: Path) -> Path:
    """A 2-layer OPT 16 wide over the tests' word tokenizer ([CLS] as BOS, [SEP] as EOS), random weights."""
    from transformers import OPTConfig, OPTForCausalLM

    _, vocab = save_tokenizer(directory, with_enc=False)
    config = OPTConfig(vocab_size=vocab, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                       word_embed_proj_dim=16, max_position_embeddings=64, init_std=0.2, dropout=0.1,
                       bos_token_id=SPECIALS.index("[CLS]"), eos_token_id=SPECIALS.index("[SEP]"), pad_token_id=0)
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(directory)
    return directory


def save_tiny_t5(directory: Path) -> Path:
    """A 2+2-layer T5 16 wide over the same word tokenizer ([SEP] as EOS, [PAD] starts the decoder)."""
    from transformers import T5Config, T5ForConditionalGeneration

    _, vocab = save_tokenizer(directory, with_enc=False)
    config = T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                      num_heads=2, dropout_rate=0.1, pad_token_id=0, eos_token_id=SPECIALS.index("[SEP]"),
                      decoder_start_token_id=0)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stage2")
    return save_tiny_blip2(root / "stage1", image_token=False), save_tiny_opt(root / "opt")


@pytest.fixture(scope="module")
def t5_checkpoints(checkpoints, tmp_path_factory) -> tuple[Path, Path]:
    return checkpoints[0], save_tiny_t5(tmp_path_factory.mktemp("stage2-t5") / "t5")


def stage2_config(checkpoints, output: Path, *overrides: str):
    stage1, lm = checkpoints
    return load_config(ROOT / "training" / "configs" / "blip2-lm-tiny.yaml",
                       [f"model.init_from={stage1}", f"model.language_model={lm}", f"output={output}",
                        f"objective.caption_prompt={PROMPT}", "log_every=1", "threads=1",
                        "data.caption_instructions=[a picture of]", *overrides])  # words the tiny LM knows


def batch(tokenizer, captions: list[str], seed: int = 0) -> Batch:
    tokens = tokenizer(captions, padding="longest", return_tensors="pt")
    n = len(captions)
    pixels = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return Batch(pixels, tokens["input_ids"], tokens["attention_mask"], torch.arange(n), torch.arange(n))


@pytest.fixture
def model(checkpoints, tmp_path):
    return prepare_model(stage2_config(checkpoints, tmp_path), [], tmp_path, is_main=True)


@pytest.fixture(params=["opt", "t5"])
def any_model(request, tmp_path):
    checkpoints = request.getfixturevalue({"opt": "checkpoints", "t5": "t5_checkpoints"}[request.param])
    return prepare_model(stage2_config(checkpoints, tmp_path), [], tmp_path, is_main=True)


def test_only_queries_qformer_and_projection_train_and_the_lm_stays_bit_identical(any_model):
    model = any_model
    model, tokenizer = model
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"query_tokens", "qformer", "language_projection"}
    before = {n: p.clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    assert not model.language_model.training and not model.vision_model.training  # no dropout in frozen parts
    losses = Blip2LMObjective(load_config(None, []).objective)(
        model, batch(tokenizer, ["a red dog on the beach", "a blue car"]), Progress(0, 0.0, 0))
    losses["lm_loss"].backward()
    optimizer.step()
    for name, p in model.named_parameters():
        same = torch.equal(p, before[name])
        assert same == name.startswith(("language_model.", "vision_model.")), name


def test_the_loss_equals_transformers_on_the_export_and_generate_equals_greedy_decoding(model, tmp_path):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from blipsearch.training.families import FAMILIES

    model, tokenizer = model
    model.eval()
    data = batch(tokenizer, ["a red dog on the beach", "a blue car", "the sky"], seed=1)
    ours = Blip2LMObjective(load_config(None, []).objective)(model, data, Progress(0, 0.0, 0))["lm_loss"]
    out = FAMILIES["blip-2-lm"].export(model, tokenizer, tmp_path / "export")[0]
    hf = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    processor = Blip2Processor.from_pretrained(out)
    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    q = hf.config.num_query_tokens
    assert processor.num_query_tokens == q == model.config.num_query_tokens and hf.config.image_token_index == image
    # the sequence transformers builds: Q <image> placeholders, then [BOS] prompt caption
    input_ids, mask, labels = with_prompt(data.input_ids, data.attention_mask, model.prompt)
    placeholders = torch.full((len(input_ids), q), image)
    hf_ids, hf_mask = torch.cat([placeholders, input_ids], 1), torch.cat([torch.ones_like(placeholders), mask], 1)
    labels[:, 0] = -100  # [BOS] is never a target (it is given)
    with torch.no_grad():  # (transformers 5.24's own `labels=` path fails on a non-contiguous view: its logits)
        logits = hf(pixel_values=data.pixel_values, input_ids=hf_ids, attention_mask=hf_mask).logits[:, q:]
    theirs = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                               ignore_index=-100)
    assert float(theirs) == pytest.approx(float(ours), abs=1e-5)
    # greedy decoding after [BOS] prompt, ours step by step without a cache, theirs through `generate`
    start = tokenizer(PROMPT, return_tensors="pt")["input_ids"][:, :-1]  # [CLS] a picture of (no [SEP])
    start = start.expand(3, -1)
    expected = model.greedy(data.pixel_values, start, max_new_tokens=6)
    generated = hf.generate(pixel_values=data.pixel_values, input_ids=torch.cat([placeholders, start], 1),
                            max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=1)
    assert torch.equal(generated[:, -6:], expected)


def test_a_stage2_run_through_the_loop_trains_and_exports(checkpoints, tmp_path):
    root = tmp_path / "data"
    scenes().write_dataset(root, seed=3, size=32, sizes={"train": 12})
    cfg = stage2_config(checkpoints, tmp_path / "run", f"data.train={root / 'train.json'}", "optim.max_steps=6",
                        "optim.lr=5e-3", "save_every=1000")
    run = setup(cfg)
    assert run.loader.collate_fn.prompt == (PROMPT, run.model.prompt)  # captions tokenised after the prompt
    lm = {n: p.clone() for n, p in run.model.language_model.named_parameters()}
    entries = run_steps(run, wrap(run))
    assert [set(e) >= {"lm_loss", "loss"} for e in entries] == [True] * 6 and "temp" not in entries[0]
    assert entries[-1]["lm_loss"] < entries[0]["lm_loss"]
    assert all(torch.equal(p, lm[n]) for n, p in run.model.language_model.named_parameters())


@pytest.mark.parametrize("family", ["blip-2-lm", "instructblip"])
def test_a_resumed_stage2_run_gives_the_same_next_losses(family, checkpoints, tmp_path):
    import json

    root = tmp_path / "data"
    scenes().write_dataset(root, seed=4, size=32, sizes={"train": 12})
    if family == "instructblip":  # questions for half of the pairs; templates are drawn per sample and epoch
        entries = json.loads((root / "train.json").read_text())
        (root / "train.json").write_text(json.dumps([{**e, "instruction": "what is it"} if i % 2 else e
                                                     for i, e in enumerate(entries)]))
    args = (f"model.family={family}", f"data.train={root / 'train.json'}", "optim.max_steps=4",
            "save_every=2")  # Q-Former dropout on
    assert_resume_is_exact(lambda name: stage2_config(checkpoints, tmp_path / name, *args), ("lm_loss",))


def test_t5_prefix_lm_loss_and_generate_equal_the_export(t5_checkpoints, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    from blipsearch.training.families import FAMILIES
    from blipsearch.training.objectives import prefix_split

    cfg = stage2_config(t5_checkpoints, tmp_path, "objective.caption_prompt=")  # no prompt: the prefix LM
    model, tokenizer = prepare_model(cfg, [], tmp_path, is_main=True)
    model.eval()
    assert not model.config.use_decoder_only_language_model and model.prompt == ()
    data = batch(tokenizer, ["a red dog on the beach", "a blue car", "the sky above the sea"], seed=2)
    ours = Blip2LMObjective(cfg.objective)(model, data, Progress(0, 0.0, seed=7))["lm_loss"]
    source, source_mask, labels = prefix_split(data.input_ids, data.attention_mask, (), 0, 7, data.sample_ids)
    lengths = data.attention_mask.sum(1)
    assert (source_mask.sum(1) + (labels != -100).sum(1)).tolist() == lengths.tolist()  # every token once
    assert ((source_mask.sum(1) >= 1) & ((labels != -100).sum(1) >= 1)).all()  # both parts non-empty
    out = FAMILIES["blip-2-lm"].export(model, tokenizer, tmp_path / "export")[0]
    hf = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    q, image = hf.config.num_query_tokens, hf.config.image_token_index
    placeholders = torch.full((3, q), image)
    with torch.no_grad():
        theirs = hf(pixel_values=data.pixel_values, input_ids=torch.cat([placeholders, source], 1),
                    attention_mask=torch.cat([torch.ones_like(placeholders), source_mask], 1), labels=labels).loss
    assert float(theirs) == pytest.approx(float(ours), abs=1e-5)
    start = tokenizer(["a red dog"] * 3, add_special_tokens=False, return_tensors="pt")["input_ids"]
    expected = model.greedy(data.pixel_values, start, max_new_tokens=6)
    generated = hf.generate(pixel_values=data.pixel_values, input_ids=torch.cat([placeholders, start], 1),
                            max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=1)
    assert torch.equal(generated[:, 1:], expected)  # after the decoder's start token


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_the_engine_captions_with_a_stage2_export_as_the_training_model_decodes(kind, request, tmp_path):
    import numpy as np

    from blipsearch.retrieval.models.captioner import load_captioner
    from blipsearch.retrieval.models.preprocessing import normalise
    from blipsearch.training.families import FAMILIES

    checkpoints = request.getfixturevalue({"opt": "checkpoints", "t5": "t5_checkpoints"}[kind])
    model, tokenizer = prepare_model(stage2_config(checkpoints, tmp_path), [], tmp_path, is_main=True)
    model.eval()
    out = FAMILIES["blip-2-lm"].export(model, tokenizer, tmp_path / "export")[0]
    captioner = load_captioner(str(out), device="cpu", precision="fp32", num_beams=1, max_new_tokens=5,
                               min_new_tokens=5)
    assert captioner.info.prompt == PROMPT  # from the export's config
    pixels = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(2)]
    pre = captioner.info.preprocessing
    values = normalise(torch.from_numpy(np.stack(pixels)), pre.mean, pre.std)
    start = torch.tensor([([tokenizer.cls_token_id] if kind == "opt" else []) + list(model.prompt)] * 2)
    expected = tokenizer.batch_decode(model.greedy(values, start, max_new_tokens=5), skip_special_tokens=True)
    assert captioner.caption(pixels) == [" ".join(text.split()) for text in expected]


def test_instructblip_reads_the_instruction_in_the_qformer_and_equals_its_export(checkpoints, tmp_path):
    from transformers import AutoTokenizer, InstructBlipForConditionalGeneration, OPTForCausalLM

    from blipsearch.training.blip2_lm import add_image_token, build_blip2_lm, export_blip2_lm
    from blipsearch.training.export import read_hf_checkpoint

    stage1, opt = checkpoints
    config, state, qformer_tokenizer = read_hf_checkpoint(str(stage1), model_type="blip-2")
    lm, tokenizer = OPTForCausalLM.from_pretrained(opt), AutoTokenizer.from_pretrained(opt)
    add_image_token(tokenizer, lm)
    torch.manual_seed(0)
    model = build_blip2_lm(config, state, lm, instruct=True).eval()
    # the Q-Former's text embeddings and LayerNorm come from stage 1, under InstructBLIP's names
    assert torch.equal(model.qformer.embeddings.word_embeddings.weight, state["embeddings.word_embeddings.weight"])
    assert torch.equal(model.qformer.embeddings.layernorm.weight, state["qformer.layernorm.weight"])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    asked = qformer_tokenizer(["what colour is the dog", "where is the car"], padding=True, return_tensors="pt")
    instruction = (asked["input_ids"], asked["attention_mask"])
    text = tokenizer(["what colour is the dog red", "where is the car on the beach"], padding=True,
                     return_tensors="pt")
    ours = model.lm_logits(pixels, text["input_ids"], text["attention_mask"], instruction)
    other = model.lm_logits(pixels, text["input_ids"], text["attention_mask"],
                            (asked["input_ids"].flip(0), asked["attention_mask"].flip(0)))
    assert not torch.allclose(ours, other)  # what is asked changes what the queries read
    out = export_blip2_lm(model, tokenizer, tmp_path / "export", 32, qformer_tokenizer)
    hf = InstructBlipForConditionalGeneration.from_pretrained(out).eval()
    q, image = hf.config.num_query_tokens, hf.config.image_token_index
    placeholders = torch.full((2, q), image)
    with torch.no_grad():
        theirs = hf(pixel_values=pixels, qformer_input_ids=instruction[0], qformer_attention_mask=instruction[1],
                    input_ids=torch.cat([placeholders, text["input_ids"]], 1),
                    attention_mask=torch.cat([torch.ones_like(placeholders), text["attention_mask"]], 1)).logits
    torch.testing.assert_close(theirs[:, q:].float(), ours[:, q:], atol=1e-5, rtol=1e-5)
    start = tokenizer(["what is it"] * 2, return_tensors="pt")["input_ids"][:, :-1]  # [CLS] what is it
    expected = model.greedy(pixels, start, max_new_tokens=5, instruction=instruction)
    generated = hf.generate(pixel_values=pixels, qformer_input_ids=instruction[0],
                            qformer_attention_mask=instruction[1], input_ids=torch.cat([placeholders, start], 1),
                            max_new_tokens=5, min_new_tokens=5, do_sample=False, num_beams=1)
    assert torch.equal(generated[:, -5:], expected)


def test_an_instructblip_run_trains_on_instructions_and_answers_and_exports(checkpoints, tmp_path):
    import json

    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    from blipsearch.training.families import FAMILIES

    root = tmp_path / "data"
    scenes().write_dataset(root, seed=5, size=32, sizes={"train": 12})
    entries = json.loads((root / "train.json").read_text())
    questions = [{**entry, "instruction": "what is in the picture"} for entry in entries[1::2]]
    (root / "qa.json").write_text(json.dumps(questions))
    (root / "captions.json").write_text(json.dumps(entries[::2]))
    # two datasets, mixed by the square root of their sizes: each batch comes from one of them
    mixture = f"data.mixture={{{root / 'qa.json'}: null, {root / 'captions.json'}: null}}"
    cfg = stage2_config(checkpoints, tmp_path / "run", "model.family=instructblip", "data.train=", mixture,
                        "optim.max_steps=6", "optim.lr=5e-3", "save_every=6")
    run = setup(cfg)
    assert type(run.sampler).__name__ == "MixtureBatches" and run.sampler.sizes == [len(questions), len(entries[::2])]
    batch = next(iter(run.loader))
    assert batch.instruction_ids is not None and batch.prompt_ids is not None
    eos = run.tokenizer.sep_token_id  # the tests' word tokenizer ends each answer with [SEP]
    assert all(ids[mask.bool()][-1] == eos for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True))
    lm = {n: p.clone() for n, p in run.model.language_model.named_parameters()}
    entries = run_steps(run, wrap(run))
    assert len(entries) == 6 and entries[-1]["lm_loss"] < entries[0]["lm_loss"]
    assert all(torch.equal(p, lm[n]) for n, p in run.model.language_model.named_parameters())
    out = FAMILIES["instructblip"].export(run.model, run.tokenizer, tmp_path / "export")[0]
    assert isinstance(InstructBlipForConditionalGeneration.from_pretrained(out), InstructBlipForConditionalGeneration)
    processor = InstructBlipProcessor.from_pretrained(out)
    assert processor.num_query_tokens == 8 and processor.qformer_tokenizer is not None
    # an export of the run's checkpoint finds the Q-Former's grown vocabulary in the run folder
    from blipsearch.training.loop import export_checkpoint

    again = export_checkpoint(run.output / "checkpoint-last.pt", tmp_path / "again")[0]
    assert InstructBlipProcessor.from_pretrained(again).qformer_tokenizer.get_vocab() == \
        processor.qformer_tokenizer.get_vocab()
    # the QA benchmark answers the test questions through transformers' processor and generate
    from benchmark_scripts import script

    scenes().write_dataset(root, seed=5, size=32, sizes={"test": 3}, with_questions=True)
    report = script("scenes_qa").main(["--data", str(root), "--model", str(out), "--max-new-tokens", "2"])
    assert report["all"]["questions"] == sum(len(e["questions"]) for e in json.loads((root / "test.json").read_text()))
    assert 0.0 <= report["all"]["exact_match"] <= 1.0 and "count" in report


def test_instructions_answers_and_their_targets():
    import random

    from blipsearch.training.data import InstructionTemplates
    from blipsearch.training.objectives import concat_prompt_answer

    templates = InstructionTemplates(("Describe it.",), ("Question: {} Answer:",))
    assert templates.instruction("what colour is the circle", random.Random(0)) == \
        "Question: what colour is the circle Answer:"
    assert templates.instruction(None, random.Random(0)) == "Describe it."
    prompt = torch.tensor([[2, 5, 6], [2, 7, 0]])  # [BOS] instruction [PAD]
    prompt_mask = (prompt != 0).long()
    answer, answer_mask = torch.tensor([[8, 9, 3], [10, 3, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    ids, mask, labels = concat_prompt_answer(prompt, prompt_mask, answer, answer_mask, pad=0)
    assert ids.tolist() == [[2, 5, 6, 8, 9, 3], [2, 7, 10, 3, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert labels.tolist() == [[-100, -100, -100, 8, 9, 3], [-100, -100, 10, 3, -100, -100]]


def test_blipsearch_train_lm_pretrains_a_language_model_that_stage2_takes(checkpoints, tmp_path):
    import json

    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blipsearch.retrieval.cli import main

    root = tmp_path / "data"
    scenes().write_dataset(root, seed=6, size=32, sizes={"train": 20}, with_questions=True)
    result = CliRunner().invoke(main, ["train-lm", str(root / "train.json"), str(tmp_path / "lm"), "--steps", "80",
                                       "--hidden", "32"])
    assert result.exit_code == 0, result.output
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "lm")
    entries = json.loads((root / "train.json").read_text())
    text = next(f"{e['instruction']} {e['caption']}" for e in entries if "instruction" in e)
    tokens = tokenizer([text], return_tensors="pt")
    assert tokenizer.unk_token_id not in tokens["input_ids"][0].tolist()  # every word of its data is known
    with torch.no_grad():  # it learnt its data: well below the uniform guess over its vocabulary
        loss = lm(**tokens, labels=tokens["input_ids"]).loss
    assert float(loss) < 0.6 * float(torch.log(torch.tensor(len(tokenizer))))
    # and stage 2 takes it as its frozen language model
    cfg = stage2_config((checkpoints[0], tmp_path / "lm"), tmp_path / "run", f"data.train={root / 'train.json'}",
                        "optim.max_steps=2", "objective.caption_prompt=")
    run = setup(cfg)
    assert len(run_steps(run, wrap(run))) == 2


def test_instructblip_gives_the_qformer_the_instruction_words_a_word_level_stage1_lacks(checkpoints, tmp_path,
                                                                                        caplog):
    from blipsearch.training.loop import prepare_model

    cfg = stage2_config(checkpoints, tmp_path, "model.family=instructblip", "data.question_templates=['Q {}']",
                        "data.caption_instructions=[a picture of, describe zebra]")
    model, _ = prepare_model(cfg, ["what colour is the dog ?", "a red dog"], tmp_path, is_main=True)
    # the LM reads them too, and its word-level tokenizer lacks them: said (the exported one would be refused)
    assert "data.caption_instructions 'describe zebra' has words that the language model" in caplog.text
    assert "data.question_templates" in caplog.text
    qformer_tokenizer = model.qformer_tokenizer
    ids = qformer_tokenizer("what colour is the zebra dog q describe")["input_ids"]
    assert qformer_tokenizer.unk_token_id not in ids  # "colour", "zebra", "q", "describe" were added
    assert qformer_tokenizer.tokenize("the zebras") == ["the", "[UNK]"]  # whole words: "zebra" is no prefix
    rows = model.qformer.embeddings.word_embeddings
    assert rows.num_embeddings == len(qformer_tokenizer) == model.config.qformer_config.vocab_size
    assert rows.weight.requires_grad  # the new rows train with the Q-Former


def test_qa_scores_exact_match_per_question_type():
    from benchmark_scripts import script

    report = script("scenes_qa").score(["red", " two ", "blue circle", "Red"], ["red", "two", "red circle", "red"],
                                       ["colour", "count", "relation", "colour"])
    assert report == {"all": {"questions": 4, "exact_match": 0.75}, "colour": {"questions": 2, "exact_match": 1.0},
                      "count": {"questions": 1, "exact_match": 1.0}, "relation": {"questions": 1, "exact_match": 0.0}}


def test_the_engine_captions_with_an_instructblip_export_as_transformers_generates(checkpoints, tmp_path):
    import numpy as np
    from PIL import Image
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    from blipsearch.retrieval.models.captioner import load_captioner
    from blipsearch.training.families import FAMILIES

    cfg = stage2_config(checkpoints, tmp_path, "model.family=instructblip", "data.caption_instructions=[a picture]")
    model, tokenizer = prepare_model(cfg, ["what is the dog ?"], tmp_path, is_main=True)
    out = FAMILIES["instructblip"].export(model.eval(), tokenizer, tmp_path / "export")[0]
    captioner = load_captioner(str(out), device="cpu", precision="fp32", num_beams=1, max_new_tokens=4,
                               min_new_tokens=4)
    assert captioner.info.prompt == "a picture"  # the run's first captioning instruction
    pixels = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(2)]
    hf = InstructBlipForConditionalGeneration.from_pretrained(out)
    processor = InstructBlipProcessor.from_pretrained(out)
    expected = []
    for image in pixels:  # transformers' own processor and generate, one image at a time
        inputs = processor(images=Image.fromarray(image), text="a picture", return_tensors="pt")
        out_ids = hf.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        new = out_ids[:, inputs["input_ids"].shape[1]:]
        expected.append(" ".join(processor.tokenizer.decode(new[0], skip_special_tokens=True).split()))
    assert captioner.caption(pixels) == expected


def test_captions_end_with_the_lm_end_token_where_the_tokenizer_appends_none():
    from blipsearch.training.objectives import with_end

    ids = torch.tensor([[2, 5, 6, 0], [2, 7, 3, 0], [2, 8, 9, 4]])  # [BOS] words [PAD]; row 1 ends with 3 already
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)
    ids, mask, labels = with_end(ids, mask, labels, end=3, pad=0)
    assert ids.tolist() == [[2, 5, 6, 3, 0], [2, 7, 3, 0, 0], [2, 8, 9, 4, 3]]
    assert mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert labels.tolist() == [[2, 5, 6, 3, -100], [2, 7, 3, -100, -100], [2, 8, 9, 4, 3]]


def test_one_image_may_hold_the_same_answer_to_two_questions(tmp_path):
    import json

    from blipsearch.training.data import json_samples

    (tmp_path / "images").mkdir()
    entries = [{"image": "x.png", "caption": "red", "instruction": "what colour is the circle ?"},
               {"image": "x.png", "caption": "a red circle"},
               {"image": "x.png", "caption": "red", "instruction": "what colour is the square ?"}]
    (tmp_path / "qa.json").write_text(json.dumps(entries))
    samples = json_samples(tmp_path / "qa.json")
    assert sorted((s.caption, s.instruction) for s in samples) == [
        ("a red circle", None), ("red", "what colour is the circle ?"), ("red", "what colour is the square ?")]


def test_a_stage2_run_names_the_captioner_it_exports_and_its_export_refuses_no_captioner(checkpoints, tmp_path):
    """`train` printed "retrieval model: OUT/retrieval", a folder a stage-2 run never writes; `export
    --no-captioner` of its checkpoint wrote the captioner anyway."""
    from click.testing import CliRunner

    from blipsearch.training.cli import cli

    stage1, lm = checkpoints
    root = tmp_path / "data"
    scenes().write_dataset(root, seed=3, size=32, sizes={"train": 8})
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(ROOT / "training" / "configs" / "blip2-lm-tiny.yaml"),
                                      "--set", f"model.init_from={stage1}", "--set", f"model.language_model={lm}",
                                      "--set", f"data.train={root / 'train.json'}", "--set", "optim.max_steps=1",
                                      "--set", "threads=1", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert f"captioner model: {out / 'captioner'}" in result.output and "retrieval" not in result.output
    refused = CliRunner().invoke(cli, ["export", str(out / "checkpoint-last.pt"), str(tmp_path / "e"),
                                       "--no-captioner"])
    assert refused.exit_code == 1 and "leave out --no-captioner" in refused.output
    assert not (tmp_path / "e").exists()


def test_train_lm_refuses_a_folder_that_holds_files_unless_overwrite(tmp_path):
    from click.testing import CliRunner

    from blipsearch.training.cli import cli

    root = tmp_path / "data"
    scenes().write_dataset(root, seed=6, size=32, sizes={"train": 4})
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "notes.md").write_text("mine")
    args = ["train-lm", str(root / "train.json"), str(tmp_path / "lm"), "--steps", "1", "--hidden", "8"]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 1 and "is not empty; name a new folder, or pass --overwrite" in refused.output
    assert (tmp_path / "lm" / "notes.md").read_text() == "mine"  # it was overwritten, silently
    replaced = CliRunner().invoke(cli, [*args, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert (tmp_path / "lm" / "config.json").is_file() and not (tmp_path / "lm" / "notes.md").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


@pytest.mark.parametrize("family, override", [("blip-2-lm", "objective.caption_prompt=a photograph of"),
                                              ("instructblip", "data.caption_instructions=[a short caption]")])
def test_a_prompt_the_language_model_cannot_read_is_refused_before_the_run(checkpoints, tmp_path, family, override):
    """It trained as "a [UNK] of", and the export kept "a of" as its prompt (or one the engine then refused)."""
    from blipsearch.retrieval.errors import InvalidInputError
    from blipsearch.training.loop import prepare_model

    cfg = stage2_config(checkpoints, tmp_path, f"model.family={family}", override)
    with pytest.raises(InvalidInputError, match=r"has words that the language model .* does not know \((photograph|"
                                                r"short, caption)\)"):
        prepare_model(cfg, ["a red dog"], tmp_path, is_main=True)
