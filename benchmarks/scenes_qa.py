"""Question answering on the scene test split, exact match per question type (colour, relation, count).

An InstructBLIP export (`blipsearch train` with `model.family: instructblip`, OUTPUT/captioner) answers each
question that `scenes.py dataset --questions` wrote for the test images, through transformers' own
`InstructBlipProcessor` and greedy `generate`: what a user of the export gets.

    python benchmarks/scenes_qa.py --data /tmp/scenes_q5 --model runs/instructblip-demo/captioner
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def score(predicted: list[str], answers: list[str], kinds: list[str]) -> dict[str, dict]:
    """Exact match (whitespace-normalised, lower case) per question type and overall."""
    out: dict[str, list[int]] = {}
    for guess, truth, kind in zip(predicted, answers, kinds, strict=True):
        hit = int(" ".join(guess.lower().split()) == " ".join(truth.lower().split()))
        for key in (kind, "all"):
            out.setdefault(key, []).append(hit)
    return {k: {"questions": len(v), "exact_match": round(sum(v) / len(v), 3)} for k, v in sorted(out.items())}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder written by `scenes.py dataset --questions`")
    parser.add_argument("--model", required=True, help="an InstructBlipForConditionalGeneration folder")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--limit", type=int, default=None, help="test images to use (default: all)")
    args = parser.parse_args(argv)

    import torch
    from PIL import Image
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    model = InstructBlipForConditionalGeneration.from_pretrained(args.model).eval()
    processor = InstructBlipProcessor.from_pretrained(args.model)
    entries = json.loads((args.data / "test.json").read_text())[:args.limit]
    predicted, answers, kinds = [], [], []
    with torch.inference_mode():
        for entry in entries:
            image = Image.open(args.data / "images" / entry["image"]).convert("RGB")
            for qa in entry["questions"]:
                inputs = processor(images=image, text=qa["question"], return_tensors="pt")
                out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, num_beams=1)
                # a decoder-only LM's output repeats its input; an encoder-decoder LM's is the answer alone
                new = out[:, inputs["input_ids"].shape[1]:] if model.config.use_decoder_only_language_model else out
                predicted.append(processor.tokenizer.decode(new[0], skip_special_tokens=True))
                answers.append(qa["answer"])
                kinds.append(qa["type"])
    report = score(predicted, answers, kinds)
    print(json.dumps({"model": args.model, "images": len(entries), **report}, indent=2))
    return report


if __name__ == "__main__":
    main()
