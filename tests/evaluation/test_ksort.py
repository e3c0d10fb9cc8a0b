"""K-Sort Eval: arenas (public layout, synthetic), matching, the loop and its stopping rule, judges and their parser,
the `ksort` CLI verb."""

import json
import random
import statistics

import pytest

from hf_fastslow.backends import BackendFeatureError
from hf_fastslow.evaluation.ksort import Arena, ArenaInstance, KSortEvaluator, gaussian_overlap, select_instance
from hf_fastslow.evaluation.ksort_judges import (
    BiasedJudge,
    JudgeFormatError,
    LikelihoodRankJudge,
    PlackettLuceJudge,
    ScriptedRankJudge,
    SyntheticOutput,
    TextRankJudge,
    VLMRankJudge,
    format_ranking,
    parse_ranking,
)
from hf_fastslow.evaluation.ksort_rating import Skill, spearman_rho


def _new(skill):
    return lambda prompt: SyntheticOutput("new", skill)


# ----- parser -------------------------------------------------------------------------------------------------------
def test_parser_recovers_random_shuffles():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 8)
        order = rng.sample(range(n), n)
        for word, labels in (("Image", "digits"), ("Answer", "letters")):
            reply = format_ranking(order, word, labels)
            assert parse_ranking(reply, n, word, labels=labels) == order
            assert parse_ranking(f' "{reply.lower()}." ', n, word, labels=labels) == order


@pytest.mark.parametrize("reply, reason", [
    ("Image 1, Image 2, Image 2, Image 4, Image 5", "duplicated"),
    ("Image 1, Image 2, Image 3, Image 4", "missing"),
    ("Image 1, Image 2, Image 3, Image 4, Image 6", "unknown"),
    ("Image 0, Image 1, Image 2, Image 3, Image 4", "unknown"),
    ("I cannot rank these images.", "not exactly"),
    ("Ranking: Image 1, Image 2, Image 3, Image 4, Image 5", "not exactly"),
    ("", "not exactly"),
])
def test_parser_rejects_bad_rankings(reply, reason):
    with pytest.raises(JudgeFormatError, match=reason) as err:
        parse_ranking(reply, 5, "Image")
    assert err.value.reply == reply


def test_lenient_parser_tolerates_prose_but_not_bad_lists():
    reply = "Sure! My ranking is Image 3, Image 1, Image 2. Image 3 has the best light."
    assert parse_ranking(reply, 3, "Image", strict=False) == [2, 0, 1]
    with pytest.raises(JudgeFormatError):
        parse_ranking(reply, 3, "Image", strict=True)
    with pytest.raises(JudgeFormatError, match="duplicated"):
        parse_ranking("Best: Image 3, Image 1, Image 3", 3, "Image", strict=False)
    with pytest.raises(JudgeFormatError, match="no list"):
        parse_ranking("Image 3 is best", 3, "Image", strict=False)


# ----- matching -----------------------------------------------------------------------------------------------------
def test_select_instance_rule_ties_and_exhaustion():
    caps, ovs = [20.0, 24.0, 26.0, 24.0], [0.0, 0.0, 0.0, 0.0]
    assert select_instance(caps, ovs, 25.0, set(), alpha=0.0) == 1  # |24-25| == |26-25|: lowest index wins
    assert select_instance(caps, ovs, 25.0, {1}, alpha=0.0) == 2
    assert select_instance(caps, [0.0, 0.9, 0.0, 0.9], 25.0, set(), alpha=0.5) == 2  # overlap penalised
    with pytest.raises(LookupError):
        select_instance(caps, ovs, 25.0, {0, 1, 2, 3})


def test_overlap_is_one_for_identical_and_small_for_separated():
    assert gaussian_overlap([Skill(25, 1), Skill(25, 1)]) == pytest.approx(1.0)
    assert gaussian_overlap([Skill(20, 0.5), Skill(30, 0.5)]) < 1e-6


@pytest.mark.parametrize("matching", ["dynamic", "static"])
def test_matching_never_repeats_an_instance(matching):
    arena = Arena.synthetic(n_models=8, n_instances=40, seed=1)
    ev = KSortEvaluator(arena, PlackettLuceJudge(seed=1), matching=matching, sigma_stop=1e-6, max_runs=1000)
    res = ev.evaluate(_new(27.0))
    ids = [s.instance for s in res.steps]
    assert len(ids) == len(set(ids)) == len(arena)  # pool exhausted, never reused
    assert not res.converged
    if matching == "static":
        assert ids == [inst.id for inst in arena.instances]


# ----- stopping, loop, correction -----------------------------------------------------------------------------------
def test_stops_at_first_sigma_below_threshold_and_respects_max_runs():
    arena = Arena.synthetic(n_models=12, n_instances=200, seed=2)
    res = KSortEvaluator(arena, PlackettLuceJudge(seed=2), sigma_stop=1.5).evaluate(_new(24.0))
    assert res.converged and res.sigma < 1.5
    assert all(s.sigma >= 1.5 for s in res.steps[:-1]) and res.steps[-1].sigma == res.sigma
    capped = KSortEvaluator(arena, PlackettLuceJudge(seed=2), sigma_stop=0.1, max_runs=7).evaluate(_new(24.0))
    assert capped.runs == 7 and not capped.converged and capped.sigma >= 0.1
    paper = KSortEvaluator(arena, PlackettLuceJudge(seed=2), sigma_stop=1.5, variance_rule="paper").evaluate(_new(24))
    assert paper.runs <= res.runs  # the paper's variance rule shrinks sigma at least as fast


def test_swapping_maps_ranks_back_to_outputs():
    arena = Arena.synthetic(n_models=10, n_instances=30, seed=3)
    oracle = PlackettLuceJudge(scale=1e-6, seed=0)  # noiseless: ranks by true quality whatever the shown order
    res = KSortEvaluator(arena, oracle, max_runs=10, sigma_stop=1e-3).evaluate(_new(26.0))
    by_id = {inst.id: inst for inst in arena.instances}
    for step in res.steps:
        qualities = [o.quality for o in by_id[step.instance].outputs] + [26.0]
        expected = sorted(range(len(qualities)), key=lambda i: -qualities[i])
        assert [step.ranks.index(r) for r in range(len(qualities))] == expected
        truth = [-q for q in qualities[:-1]]
        assert step.rho == pytest.approx(spearman_rho(by_id[step.instance].human_rank, truth))


def test_estimates_true_skill_and_correction_helps_under_biased_judge():
    # Fixed seeds: deterministic. The 50-seed version is benchmarks/ksort.py; the slow test below runs 12 seeds.
    errs = {True: [], False: []}
    for seed in range(3):
        arena = Arena.synthetic(seed=seed)
        for skill in (20.0, 29.0):
            for corr in (True, False):
                res = KSortEvaluator(arena, BiasedJudge(seed=seed), correction=corr, seed=seed).evaluate(_new(skill))
                errs[corr].append(abs(res.mu - skill))
    assert statistics.mean(errs[True]) < statistics.mean(errs[False])
    assert statistics.mean(errs[True]) < 1.5


def test_noise_judge_does_not_recover_skill():
    # A judge whose noise swamps the skills (scale 1000) must leave the estimate far from a skill of 33.
    arena = Arena.synthetic(seed=0)
    res = KSortEvaluator(arena, PlackettLuceJudge(scale=1000.0, seed=0), correction=False).evaluate(_new(33.0))
    good = KSortEvaluator(arena, PlackettLuceJudge(seed=0), correction=False).evaluate(_new(33.0))
    assert abs(good.mu - 33.0) < 1.5 < abs(res.mu - 33.0)


def test_judge_garbage_is_counted_never_dropped():
    arena = Arena.synthetic(n_models=10, n_instances=100, seed=4)
    judge = PlackettLuceJudge(seed=4, garbage_rate=0.4)
    res = KSortEvaluator(arena, judge, judge_retries=1, max_runs=40, sigma_stop=0.01).evaluate(_new(25.0))
    replies = [r for s in res.steps for r in s.judge_replies]
    assert res.judge_failures == len(replies) > 0
    assert all(r == "I cannot rank these images." for r in replies)
    skipped = [s for s in res.steps if s.skipped]
    assert res.skipped_runs == len(skipped) > 0 and all(len(s.judge_replies) == 2 for s in skipped)
    assert res.updates == res.runs - res.skipped_runs
    assert all(s.ranks is None and s.lam is None for s in skipped)


# ----- arenas on disk -----------------------------------------------------------------------------------------------
def _text_arena():
    board = {"good": Skill(30, 0.5), "fair": Skill(27, 0.5), "poor": Skill(24, 0.5), "bad": Skill(21, 0.5)}
    insts = [ArenaInstance(f"q{i}", f"Question {i}?", (f"[good] a{i}", f"[fair] a{i}", f"[poor] a{i}", f"[bad] a{i}"),
                           ("good", "fair", "poor", "bad"), (0.0, 1.0, 2.0, 3.0)) for i in range(12)]
    return Arena(insts, board, modality="text")


def test_text_arena_round_trip_and_public_metadata(tmp_path):
    np = pytest.importorskip("numpy")
    arena = _text_arena()
    root = arena.save_local_dir(tmp_path / "arena")
    back = Arena.from_local_dir(root)
    assert back.modality == "text" and len(back) == 12 and back.leaderboard == arena.leaderboard
    assert back.instances[0].outputs == arena.instances[0].outputs
    assert back.mean_capacity == pytest.approx(arena.mean_capacity)
    meta = root / "Text_meta"  # the public metadata files take precedence (and fix the instance order)
    np.save(meta / "subfolders_text.npy", np.array(["q3", "q1"]))
    np.save(meta / "avg_capacitys_text.npy", np.array([[20.0, 22.0, 24.0, 26.0], [30.0, 30.0, 30.0, 30.0]]))
    np.save(meta / "total_overlaps_text.npy", np.array([0.1, 0.2]))
    meta_arena = Arena.from_local_dir(root)
    assert [i.id for i in meta_arena.instances] == ["q3", "q1"]
    assert meta_arena.mean_capacity == [23.0, 30.0] and meta_arena.overlap == [0.1, 0.2]
    np.save(meta / "subfolders_text.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="unpickle"):
        Arena.from_local_dir(root)


def test_public_image_layout_names_and_errors(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path / "ksort"
    (root / "Image_meta").mkdir(parents=True)
    rows = [{"🤖 Model": m, "⭐ Score (μ/σ)": f"{mu - 1.5:.2f} ({mu}/0.5)"}
            for m, mu in (("FLUX.1-dev", 28.8), ("LCM-v1.5", 22.0), ("Dreamshaper-xl", 25.0), ("SD-v1.5", 20.1))]
    (root / "Image_meta" / "Arena-Leaderboard-Image.json").write_text(json.dumps({"sorted_score_list": rows}))
    inst = root / "Image" / "0001"
    inst.mkdir(parents=True)
    (inst / "result.json").write_text(json.dumps({
        "prompt": ["a cat"], "img_rank": [0, 2, 1, 3],
        "models_name": ["0_FLUX.1-dev", "1_LCM", "2_Dreamshaper-xl-turbo", "3_SD-v1.5"]}))
    for i in range(3):
        Image.new("RGB", (8, 8)).save(inst / f"{i}.jpg")
    with pytest.raises(FileNotFoundError, match="3.jpg"):
        Arena.from_local_dir(root)
    Image.new("RGB", (8, 8)).save(inst / "3.jpg")
    arena = Arena.from_local_dir(root)
    assert arena.modality == "image" and arena.instances[0].models == ("FLUX.1-dev", "LCM-v1.5", "Dreamshaper-xl",
                                                                       "SD-v1.5")
    assert arena.leaderboard["FLUX.1-dev"] == Skill(28.8, 0.5)
    assert arena.instances[0].outputs[0].endswith("0.jpg")
    with pytest.raises(ValueError, match="missing from the leaderboard"):
        Arena([ArenaInstance("x", "p", ("a", "b"), ("A", "B"), (0, 1))], {"A": Skill()})


def test_agreement_filter_keeps_agreeing_instances():
    arena = Arena.synthetic(n_models=10, n_instances=200, seed=5, min_rho=None)
    kept = arena.agreement_filtered(0.75)
    assert 0 < len(kept) < len(arena)
    for inst in kept.instances:
        assert spearman_rho(inst.human_rank, [-arena.leaderboard[m].mu for m in inst.models]) > 0.75


# ----- judges on models ---------------------------------------------------------------------------------------------
def test_text_judge_through_backend_layer():
    from hf_fastslow.backends.testing import ScriptedBackend

    def responder(messages, index, kwargs):
        # A "judge" that reads the answers and ranks them by their quality tag.
        text = messages[-1]["content"]
        tags = {"[good]": 0, "[fair]": 1, "[new]": 2, "[poor]": 3, "[bad]": 4}
        blocks = text.split("Answer ")[1:]
        scored = sorted(blocks, key=lambda b: next(v for t, v in tags.items() if t in b))
        return ", ".join(f"Answer {b.split(':')[0]}" for b in scored)

    backend = ScriptedBackend(responder)
    judge = TextRankJudge(backend)
    res = KSortEvaluator(_text_arena(), judge, max_runs=12).evaluate(lambda p: "[new] my answer")
    assert res.judge_failures == 0 and all(s.rho == pytest.approx(1.0) for s in res.steps)
    assert all(s.ranks == [0, 1, 3, 4, 2] for s in res.steps)  # between fair and poor, every time
    assert 24 < res.mu < 27 and len(backend.ledger) == res.runs
    system = backend.calls[0].messages[0]["content"]
    assert "Answer 1, Answer 2, Answer 3, Answer 4, Answer 5" in system


def test_likelihood_judge_ranks_by_mean_token_logprob():
    from hf_fastslow.backends.testing import ScriptedBackend

    def scorer(messages, continuation):  # "[k]" tagged answers: higher k, less likely tokens
        k = int(continuation.split("]")[0].strip("["))
        return [-float(k)] * (3 + k)  # lengths differ: the judge must average, not sum

    backend = ScriptedBackend("unused", scorer=scorer)
    judge = LikelihoodRankJudge(backend)
    assert judge.rank("q", ["[3] c", "[1] a", "[5] e", "[2] b"]) == [1, 3, 0, 2]
    assert len(backend.ledger) == 4
    with pytest.raises(BackendFeatureError):
        LikelihoodRankJudge(ScriptedBackend("no scorer"))


def test_scripted_judge_garbage_through_evaluator():
    judge = ScriptedRankJudge(lambda prompt, outs: "Answer 1, Answer 1, Answer 2, Answer 3, Answer 4",
                              item_word="Answer")
    res = KSortEvaluator(_text_arena(), judge, max_runs=3, judge_retries=2).evaluate(lambda p: "x")
    assert res.judge_failures == 9 and res.skipped_runs == 3 and res.updates == 0 and res.mu == 25.0


def _tiny_vlm():
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from tests.conftest import byte_tokenizer

    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% else %}<image>{% endif %}"
        "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=len(tok), pad_token_id=0, eos_token_id=1, bos_token_id=2,
                       max_position_embeddings=2048)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    processor = LlavaProcessor(image_processor=ImageProcessor(size={"shortest_edge": 32},
                                                              crop_size={"height": 32, "width": 32}),
                               tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                               chat_template=tok.chat_template, image_token="<image>", num_additional_image_tokens=1)
    return model, processor


def test_vlm_judge_on_tiny_random_vlm_counts_its_garbage():
    Image = pytest.importorskip("PIL.Image")
    model, processor = _tiny_vlm()
    board = {m: Skill(mu, 0.5) for m, mu in (("a", 30.0), ("b", 27.0), ("c", 24.0), ("d", 21.0))}
    images = tuple(Image.new("RGB", (40, 40), (60 * i, 20, 200 - 40 * i)) for i in range(4))
    arena = Arena([ArenaInstance(f"i{j}", f"a square {j}", images, ("a", "b", "c", "d"), (0, 1, 2, 3))
                   for j in range(3)], board, modality="image")
    judge = VLMRankJudge(model, processor, max_new_tokens=6)
    res = KSortEvaluator(arena, judge, judge_retries=0).evaluate(lambda p: Image.new("RGB", (40, 40), (9, 9, 9)))
    # Random weights emit bytes, never a permutation: every run is a counted failure with its raw reply kept.
    assert res.runs == 3 and res.judge_failures == 3 and res.skipped_runs == 3
    assert all(isinstance(r, str) for s in res.steps for r in s.judge_replies)
    inputs = processor.apply_chat_template(judge.local_messages("p", list(images) + [images[0]]),
                                           add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == 5  # all K+1 images reach the model


def test_vlm_judge_endpoint_messages_carry_data_uris():
    Image = pytest.importorskip("PIL.Image")

    class FakeBackend:  # stands in for EndpointBackend: records what would be sent
        def chat(self, messages, **kw):
            self.sent = messages
            from hf_fastslow.backends import Completion

            return [Completion("Image 2, Image 1, Image 3", 0, 0)]

    backend = FakeBackend()
    judge = VLMRankJudge(backend)
    order = judge.rank("a cat", [Image.new("RGB", (8, 8)) for _ in range(3)])
    assert order == [1, 0, 2]
    parts = backend.sent[1]["content"]
    urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert len(urls) == 3 and all(u.startswith("data:image/jpeg;base64,") for u in urls)
    assert "Image 1, Image 2, Image 3" in backend.sent[0]["content"]


# ----- CLI ----------------------------------------------------------------------------------------------------------
def test_ksort_cli_synthetic_and_text_arena(tmp_path, capsys):
    from hf_fastslow.cli import main

    out = tmp_path / "report.json"
    assert main(["ksort", "--synthetic", "--n-models", "10", "--instances", "120", "--judge", "biased",
                 "--out", str(out), "--no-plot"]) == 0
    report = json.loads(out.read_text())
    assert report["result"]["runs"] == len(report["result"]["steps"]) and report["judge"]["lapse"] == 0.3
    assert "cpu_s" in report and "rank" in report["result"]
    root = _text_arena().save_local_dir(tmp_path / "arena")
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({f"Question {i}?": "[new] x" for i in range(12)}))
    assert main(["ksort", "--arena", str(root), "--answers", str(answers), "--out", str(out)]) == 2  # no judge
    assert "judge-endpoint" in capsys.readouterr().err
    assert main(["ksort", "--arena", str(root), "--synthetic"]) == 2


@pytest.mark.slow
def test_correction_and_dynamic_matching_over_seeds():
    errs, runs = {True: [], False: []}, {"dynamic": [], "static": []}
    for seed in range(12):
        arena = Arena.synthetic(seed=seed)
        skill = random.Random(seed).uniform(17, 33)
        for corr in (True, False):
            res = KSortEvaluator(arena, BiasedJudge(seed=seed), correction=corr, seed=seed).evaluate(_new(skill))
            errs[corr].append(abs(res.mu - skill))
        for matching in runs:
            res = KSortEvaluator(arena, PlackettLuceJudge(seed=seed), matching=matching, seed=seed).evaluate(
                _new(skill))
            runs[matching].append(res.runs)
    assert statistics.mean(errs[True]) < statistics.mean(errs[False])
    assert statistics.mean(runs["dynamic"]) < statistics.mean(runs["static"])
