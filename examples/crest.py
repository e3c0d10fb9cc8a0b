"""CREST: calibrate per-head steering vectors, save/load them, and steer the default model at step boundaries.

    python examples/crest.py

Calibration here reads a handful of written traces (one step per line, as SmolLM2 writes them; lines with "Wait",
"Let me verify", ... are the non-linear steps) so that the example runs in well under a minute; the benchmark
(benchmarks/crest.py) calibrates on the model's own sampled answers instead.
"""

import tempfile
from pathlib import Path

import torch

from hf_fastslow import load_default_model
from hf_fastslow.evaluation.prompts import chat_text, encode_chat
from hf_fastslow.generation.crest import CRESTCalibrator, CRESTSteerer, CRESTVectors

torch.set_num_threads(1)
model, tok = load_default_model()  # SmolLM2-135M-Instruct, offline
question = "Tom has 3 boxes of 12 pens and gives away 7 pens. How many pens does he have left?"
steps = [
    "Each box holds 12 pens.\nThere are 3 boxes, so 3 * 12 = 36 pens.\nWait, let me check: 12 + 12 + 12 = 36.\n"
    "He gives away 7, so 36 - 7 = 29.\nThe answer is 29.",
    "There are 3 boxes.\nEach box has 12 pens.\nSo he has 36 pens.\nHe gives away 7 pens.\nThe answer is 29.",
    "3 * 12 = 36 pens in total.\nLet me verify the product: 36 / 3 = 12.\nThen 36 - 7 = 29.\nThe answer is 29.",
    "Multiply 3 by 12 to get 36.\nSubtract 7 to get 29.\nHmm, 36 - 7 = 29 is right.\nThe answer is 29.",
    "The pens are 3 * 12 = 36.\nAfter giving 7 away: 29.\nThe answer is 29.",
    "First, 3 boxes times 12 pens is 36.\nAlternatively, add 12 three times: 36.\nNext, 36 - 7 = 29.\nSo 29 pens.",
]
prompt = chat_text(tok, question)
calibrator = CRESTCalibrator(model, tok, delimiter="\n").collect([(prompt, s) for s in steps])
vectors = calibrator.fit()
print(f"calibrated on {calibrator.num_steps} steps ({calibrator.num_nonlinear} non-linear); "
      f"best head probe accuracy {vectors.accuracy.max():.2f}")
with tempfile.TemporaryDirectory() as tmp:
    path = vectors.save(Path(tmp) / "crest_smollm2.safetensors")
    print(f"saved {path.stat().st_size:,} bytes; reloaded: {CRESTVectors.load(path).shape} (layers, heads, hidden)")

enc = encode_chat(tok, ["A farmer has 4 rows of 9 apple trees and cuts down 5 trees. How many trees are left? "
                        "Solve it one step per line and check your work."])
kw = dict(max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id)
plain = model.generate(**enc, **kw)[0, enc["input_ids"].shape[1]:]
with CRESTSteerer(model, vectors, strength=4.0, top_ratio=0.38) as steerer:
    steered = model.generate(**enc, **kw)[0, enc["input_ids"].shape[1]:]
first = vectors.boundary.positions(plain.tolist(), int(enc["input_ids"][0, -1]))
same_prefix = first == [] or torch.equal(plain[:first[0] + 1], steered[:first[0] + 1])
print(f"plain: {len(plain)} tokens: {tok.decode(plain, skip_special_tokens=True)!r}")
print(f"CREST: {len(steered)} tokens, {steerer.boundary_steps} boundary tokens steered "
      f"({len(steerer.heads)} heads): {tok.decode(steered, skip_special_tokens=True)!r}")
print(f"identical up to the first step boundary: {same_prefix}")
