"""Every script in examples/ runs as `python examples/<name>.py` and prints what it promises: on the default model,
or on a tiny random model where the method needs a model trained for it (the diffusion-LM examples, the classifier
trainers).

One fast script stays in the default suite; the others take a minute or more on a 2-core CPU and are marked slow
(`python -m pytest -m slow tests/test_examples.py`). Each runs in a fresh interpreter in a temporary directory.
"""

from __future__ import annotations

import re

import pytest

from tests.script_runner import REPO, converted_default_model, run_python  # noqa: F401  (fixture)

EXAMPLES = REPO / "examples"
slow = pytest.mark.slow

# script -> (patterns its output must contain, timeout in seconds, marks)
CASES = {
    "das_speculative.py": (
        [r"DAS call 1: .* same tokens as plain generate: True", r"DAS call 2: .* same tokens as plain generate: True"],
        300, ()),
    "xquant_cache.py": (
        [r"\[xquant, 4-bit\]", r"\[XQuant-CL, 2-bit\]", r"an fp16 K/V cache would hold [\d,]+ \([\d.]+x more\)"],
        600, (slow,)),
    "aurora_online.py": (
        [r"request 3: head version [1-9]\d*, .* same tokens as plain generate: True", r"trained 15 steps"],
        900, (slow,)),
    "v1_infer.py": ([r"V1-Infer picks candidate \d after \d+ judge calls", r"majority vote picks candidate \d"],
                    900, (slow,)),
    "fst_trainer.py": ([r"step 2: mean reward", r"best fast context", r"saved and reloaded the context"], 1200,
                       (slow,)),
    "pairrl_trainer.py": ([r"step 2: solver reward [\d.]+, judge rows \d+"], 1800, (slow,)),
    "qvg_cache.py": ([r"\[qvg, 4-bit, 1 stage\]", r"\[QVG, 2-bit, 2 stages\]",
                      r"an fp16 K/V cache would hold [\d,]+ \([\d.]+x more\)"], 600, (slow,)),
    "qvg_video.py": ([r"\[QVG int2\] latents \(1, 16, 8, 16, 16\), cache [\d,]+ bytes",
                      r"\[KIVI-style int2\] .*latent error vs exact"], 300, (slow,)),
    "ear_attention.py": ([r"layer 15, density 0\.2: EAR relative attention error [\d.]+",
                          r"SVG2-style relative attention error [\d.]+", r"below min_q_len is plain SDPA: True"],
                         300, (slow,)),
    "iha.py": ([r"identity conversion: max \|delta logit\| = \S+, same greedy tokens: True",
                r"trained 12,960 IHA parameters",
                r"saved and reloaded with from_pretrained_iha: logits identical: True"], 300, (slow,)),
    "care.py": ([r"\[CARE 50% KV\]", r"original 46080, CARE 23040", r"reloaded: same tokens: True"], 300, (slow,)),
    "crest.py": ([r"calibrated on \d+ steps \(\d+ non-linear\)", r"identical up to the first step boundary: True"],
                 300, (slow,)),
    "block_diffusion.py": ([r"block_size=1 equals greedy generate: True",
                            r"config after save/from_pretrained: BlockDiffusionConfig\(mask_token_id=127"], 300,
                           (slow,)),
    "dlm_convert.py": ([r"ISD \(greedy, N=4\): 16/16 answers right, 16/16 equal", r"2\.25 tokens per forward"], 600,
                       (slow,)),
    "isd.py": ([r"ISD greedy N=2: same tokens as generate: True", r"ISD greedy N=4: same tokens as generate: True",
                r"R-ISD greedy N=3 .*same tokens as the base model's generate: True"], 300, (slow,)),
    "rcd.py": ([r"alpha=0 equals the baseline: True", r"step \d+: loss [\d.]+"], 300, (slow,)),
    "losa.py": ([r"full budget, all tokens active == dense decoding: True", r"LOSA loaded [\d.]+% of the prefix KV"],
                300, (slow,)),
    "qttt.py": ([r"qTTT answer after 8 steps", r"weights restored bit for bit: True"], 600, (slow,)),
    "early_readout.py": ([r"readout accuracy [\d.]+, flagged after warm-up", r"mean weight of flagged examples"], 600,
                         (slow,)),
    "feature_sieve.py": ([r"\d+ aux steps, \d+ forget steps"], 600, (slow,)),
    "dts.py": ([r"DTS: \d+ pairs from 4 problems", r"sampling peer: \d+ pairs",
                r"(DPO step done: loss [\d.]+|no mixed-correctness pair)"], 900, (slow,)),
    "backends.py": ([r"streamed \d+ deltas, joined == greedy text: True", r"ledger: \d+ calls"], 300, (slow,)),
    "squeeze_evolve.py": ([r"Squeeze Evolve answer: \S+", r"loop 1: routes \[", r"RSA \(expensive tier only\) answer"],
                          300, (slow,)),
    "catts.py": ([r"step 1: votes .* -> (arbiter|majority)", r"CATTS: \d/2 episodes solved, \d+ arbiter calls",
                  r"majority vote: \d/2 episodes solved, 0 arbiter calls"], 900, (slow,)),
    "staircase.py": ([r"MoA TTFT [\d.]+ s", r"staircase TTFT [\d.]+ s, total [\d.]+ s, \d+ aggregator call\(s\)",
                      r"staircase TTFT / MoA TTFT = [\d.]+"], 600, (slow,)),
    "speculative_agent.py": ([r"SpeculativeAgent \(teacher policy\): answer .*correct True.*unsafe calls before "
                              r"commit: 0", r"SequentialReActAgent \(teacher policy\): answer .*correct True",
                              r"SmolLM2-135M-Instruct, untrained: \d+ turns, \d+ valid"], 600, (slow,)),
    "ipw.py": ([r"meter: .*; (measured|ESTIMATED)",
                r"\| fp32 \| [\d.]+ \([\d.]+-[\d.]+\) \| [\d.]+ \((measured|estimated)\)",
                r"routing int8 -> fp32 \(oracle router\): \d+% of queries stay on int8"], 600, (slow,)),
    "ksort.py": ([r"good judge: mu [\d.]+ \+- 0\.7\d after \d+ runs \(converged\)",
                  r"biased judge, corrected: .*\|mu - true\| [\d.]+",
                  r"biased judge, uncorrected: .*\|mu - true\| [\d.]+"], 300, ()),
    "mast.py": ([r"score mode, highest P\(yes\): ", r"generate mode: ", r"heuristics: \['1\.3'\]",
                 r"heuristics on 5 fixtures: pooled kappa 1\.00", r"CATTS episode \(success (True|False)\) as a trace"],
                1200, (slow,)),
    "concept_bottleneck.py": ([r"reloaded through AutoModel: ConceptBottleneckModel",
                               r"CooP tuned on validation: influence \S+, beta [\d.]+",
                               r"oracle +test accuracy after 0\.\.3 queries",
                               r"all 7 groups revealed: accuracy 100\.0"], 900, (slow,)),
    "slimming.py": ([r"sliced child equals the masked model: True",
                     r"reloaded as SlimViTForImageClassification: logits identical: True"], 900, (slow,)),
    "metadock.py": ([r"dense iMAML Conv4-32: 5-way 1-shot meta-test accuracy [\d.]+ ± [\d.]+",
                     r"MetaDOCK Conv4-32 @ 50%: meta-test accuracy [\d.]+ .*active kernels per task [\d.]+",
                     r"reloaded with AutoModelForImageClassification: Conv4ForImageClassification, same logits: True",
                     r"ResNet from config: 12 gated convs"], 900, (slow,)),
    "replica_router.py": ([r"answered 8 of 8",
                           r"removed: 2 consecutive failures; last: BackendUnreachableError: .*Connection refused",
                           r"after 2 HTTP 503s: 'ok', backed off 1\.5 s",
                           r"all replicas down: 2 rows reported, healthy now: \[\]"], 120, ()),
    "bench.py": ([r"\d+ methods in the registry", r"status: measured, \d+ s of wall",
                  r"CooP - best baseline, AUC points: ours -?[\d.]+", r"\| concept_bottleneck \| .* \| measured \|",
                  r"generated block for a docs page: \d+ lines"], 300, (slow,)),
    "distributed_trainers.py": ([r"FST fast context identical on both ranks: True \(pool and Pareto scores too: True\)",
                                 r"FST reflector calls per rank: \[1, 0\]",
                                 r"DAS history: rank 0 holds (\d+) rollouts, rank 1 holds \1, identical: True"],
                                300, ()),
}


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


@pytest.mark.usefixtures("converted_default_model")
@pytest.mark.parametrize("script", [pytest.param(name, marks=CASES[name][2], id=name) for name in CASES])
def test_example_runs(script, tmp_path):
    patterns, timeout, _ = CASES[script]
    proc = run_python([str(EXAMPLES / script)], cwd=tmp_path, timeout=timeout)
    for pattern in patterns:
        assert re.search(pattern, proc.stdout), f"{pattern!r} not in the output of {script}:\n{proc.stdout[-3000:]}"
    assert not list(tmp_path.iterdir()), "examples must not leave files behind"
