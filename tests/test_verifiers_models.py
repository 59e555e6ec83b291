"""Model-based verifiers: PRM (step-tag and classifier formats), self-evaluation, learned probe.

Tiny random models stand in for the policy and the PRMs; the PRMs' step scores are checked against
transformers run on the whole text, and every verifier's charges against the tokens it appended.
"""

from __future__ import annotations

import gc

import pytest
import torch

import ttc
from ttc.graph import Branch, Meter, Step
from ttc.verifiers.probe import ProbeVerifier, fit_logistic, roc_auc
from ttc.verifiers.prm import PRMVerifier, prompt_question
from ttc.verifiers.self_eval import SelfEvalVerifier, word_token_ids

from conftest import make_tiny_folder

QUESTION = "What is 2 + 3?"
STEPS = ["Step 1: 2 + 3 = 5.\n\n", "Step 2: So the answer is 5.\n\n"]
CLASSIFIER_TAG = "<file_sep>"  # a special token of the embedded tokenizer stands in for Qwen's <extra_0>


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP workers spin-wait on a busy machine (20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_branch(model, prompt, step_texts, finished=False, eos=False) -> Branch:
    """A root and one child per step text, built as the proposer builds them (forks sharing KV)."""
    engine, tok = model.engine, model.tokenizer
    seq = engine.new_sequence(tok.encode_prompt(prompt))
    engine.forward([seq])
    branch = Branch(handle=seq)
    for k, text in enumerate(step_texts):
        ids = tok.encode(text, add_special_tokens=False)
        last = k == len(step_texts) - 1
        if last and eos:
            ids = ids + [tok.eos_ids[0]]
        (child,) = engine.fork(branch.handle, 1)
        engine.extend(child, ids, charge="generated")
        branch = branch.child(child, Step(text, tuple(ids), 0.0, "eos" if last and eos else "step"), seed=0,
                              finished=finished and last)
    return branch


def lineage(branch: Branch) -> list[Branch]:
    out = []
    while branch is not None:
        out.append(branch)
        branch = branch.parent
    return out[::-1]


def release_policy(model, branches) -> None:
    model.engine.release([b.handle for br in branches for b in lineage(br)])


# -------------------------------------------------------------------------------------------------
# PRM fixtures


@pytest.fixture(scope="module")
def step_tag_dir(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("prm_step_tag"), "llama", seed=1)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny Qwen2.5-Math-PRM-shaped folder: base model weights plus a random `score` head."""
    from safetensors.torch import load_file, save_file

    folder = make_tiny_folder(tmp_path_factory.mktemp("prm_classifier"), "qwen2", seed=2)
    hidden = 64
    torch.manual_seed(3)
    head = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))
    file = folder / "model.safetensors"
    tensors = load_file(str(file))
    tensors.pop("lm_head.weight", None)  # a reward model has no LM head
    tensors.update({f"score.{k}": v.contiguous() for k, v in head.state_dict().items()})
    save_file(tensors, str(file), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def step_tag_prm(tiny_model, step_tag_dir):
    return PRMVerifier(tiny_model, str(step_tag_dir), dtype="float32", kv_cache_gb=0.02)


@pytest.fixture(scope="module")
def classifier_prm(tiny_model, classifier_dir):
    return PRMVerifier(tiny_model, str(classifier_dir), tag=CLASSIFIER_TAG, dtype="float32", kv_cache_gb=0.02)


def hf_step_tag_scores(folder, ids, rows, good, bad):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, rows][:, [good, bad]]
    return logits.softmax(-1)[:, 0]


def hf_classifier_scores(folder, ids, rows):
    import transformers
    from safetensors.torch import load_file

    base = transformers.AutoModel.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    w = load_file(str(folder / "model.safetensors"))
    with torch.no_grad():
        h = base(torch.tensor([ids])).last_hidden_state[0, rows]
        x = torch.relu(h @ w["score.0.weight"].T + w["score.0.bias"]) @ w["score.2.weight"].T + w["score.2.bias"]
    return x.softmax(-1)[:, 1]


# -------------------------------------------------------------------------------------------------
# PRM


def test_question_is_recovered_from_chat_and_plain_prompts(tiny_model):
    tok = tiny_model.tokenizer
    assert prompt_question(tok, tok.encode_prompt([{"role": "user", "content": QUESTION}])) == QUESTION
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    assert prompt_question(tok, tok.encode_prompt(with_system)) == QUESTION
    assert prompt_question(tok, tok.encode_prompt("Q: " + QUESTION)) == "Q: " + QUESTION


def test_step_tag_prm_text_is_tokenized_as_the_whole_math_shepherd_text(step_tag_prm):
    ids, rows = step_tag_prm.encode(QUESTION, [s.strip() for s in STEPS])
    whole = f"{QUESTION} {STEPS[0].strip()} ки\n{STEPS[1].strip()} ки"
    assert ids == step_tag_prm.tokenizer.encode(whole)
    tag_last = step_tag_prm.tag_ids[-1]
    assert [ids[r] for r in rows] == [tag_last, tag_last] and rows[-1] == len(ids) - 1


def test_step_tag_prm_scores_match_transformers_on_the_whole_text(tiny_model, step_tag_prm, step_tag_dir):
    branch = make_branch(tiny_model, [{"role": "user", "content": QUESTION}], STEPS)
    first = branch.parent
    meter = Meter()
    (s1,) = step_tag_prm.score([first], meter)
    (s2,) = step_tag_prm.score([branch], meter)
    ids, rows = step_tag_prm.encode(QUESTION, [s.strip() for s in STEPS])
    good, bad = step_tag_prm.candidate_ids.tolist()
    expect = hf_step_tag_scores(step_tag_dir, ids, rows, good, bad)
    assert torch.allclose(torch.tensor(step_tag_prm.step_scores_of(branch)), expect, atol=1e-4)
    assert s1 == pytest.approx(float(expect[0]), abs=1e-4) and s2 == pytest.approx(float(expect[1]), abs=1e-4)
    assert torch.allclose(torch.tensor(step_tag_prm.step_scores(QUESTION, [s.strip() for s in STEPS])), expect,
                          atol=1e-4)
    step_tag_prm.release(lineage(branch))
    release_policy(tiny_model, [branch])


def test_classifier_prm_scores_match_transformers_on_the_whole_text(tiny_model, classifier_prm, classifier_dir):
    assert classifier_prm.format.kind == "classifier"  # found by the score.* head in the folder
    branch = make_branch(tiny_model, [{"role": "user", "content": QUESTION}], STEPS)
    meter = Meter()
    classifier_prm.score([branch.parent], meter)
    (score,) = classifier_prm.score([branch], meter)
    steps = [s.strip() for s in STEPS]
    ids, rows = classifier_prm.encode(QUESTION, steps)
    # the Qwen2.5-Math-PRM layout: system, user question, assistant steps each followed by the separator
    whole = classifier_prm.tokenizer.hf.apply_chat_template(
        [{"role": "system", "content": classifier_prm.format.system_prompt}, {"role": "user", "content": QUESTION},
         {"role": "assistant", "content": CLASSIFIER_TAG.join(steps) + CLASSIFIER_TAG}], tokenize=False)
    assert classifier_prm.tokenizer.encode(whole, add_special_tokens=False)[: len(ids)] == ids
    expect = hf_classifier_scores(classifier_dir, ids, rows)
    assert torch.allclose(torch.tensor(classifier_prm.step_scores_of(branch)), expect, atol=1e-4)
    assert score == pytest.approx(float(expect[-1]), abs=1e-4)
    classifier_prm.release(lineage(branch))
    release_policy(tiny_model, [branch])


def test_a_new_step_costs_only_its_own_prm_tokens(tiny_model, step_tag_prm):
    branch = make_branch(tiny_model, [{"role": "user", "content": "What is 7 * 6?"}], STEPS)
    ids, rows = step_tag_prm.encode("What is 7 * 6?", [s.strip() for s in STEPS])
    meter = Meter()
    step_tag_prm.score([branch.parent], meter)
    before = meter.ledger.verifier_tokens
    step_tag_prm.score([branch], meter)
    assert meter.ledger.verifier_tokens - before == rows[1] - rows[0]  # the second step and its tag, nothing else
    assert meter.ledger.prefill_tokens == 0 and meter.ledger.generated_tokens == 0
    again = meter.ledger.verifier_tokens
    step_tag_prm.score([branch], meter)  # already scored: free
    assert meter.ledger.verifier_tokens == again
    step_tag_prm.release(lineage(branch))
    release_policy(tiny_model, [branch])


def grow(model, branch: Branch, text: str) -> Branch:
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    (child,) = model.engine.fork(branch.handle, 1)
    model.engine.extend(child, ids, charge="generated")
    return branch.child(child, Step(text, tuple(ids), 0.0, "step"), seed=0, finished=False)


def test_siblings_share_the_prm_prompt_and_a_parent_is_scored_before_its_child(tiny_model, step_tag_prm):
    q = "What is 9 - 4?"
    root = make_branch(tiny_model, [{"role": "user", "content": q}], [])
    a1 = grow(tiny_model, root, STEPS[0])
    a2 = grow(tiny_model, a1, STEPS[1])
    b1 = grow(tiny_model, root, "Step 1: 9 - 4 = 5.\n\n")
    meter = Meter()
    step_tag_prm.score([a2, b1, a1], meter)  # one call: the prompt, then a1 and b1, then a2 forking a1
    prompt = len(step_tag_prm.prompt_ids(q))
    a_ids, a_rows = step_tag_prm.encode(q, [s.strip() for s in STEPS])
    b_ids, _ = step_tag_prm.encode(q, ["Step 1: 9 - 4 = 5."])
    assert meter.ledger.verifier_tokens == len(a_ids) + len(b_ids) - prompt  # every token once
    assert meter.ledger.forward_passes == 3
    assert step_tag_prm.step_scores_of(a2)[0] == step_tag_prm.step_scores_of(a1)[0]
    step_tag_prm.release([root, a1, a2, b1])
    release_policy(tiny_model, [a2, b1])


def test_a_whole_solution_step_is_scored_paragraph_by_paragraph(tiny_model, step_tag_prm):
    q = "What is 1 + 1?"
    stepwise = make_branch(tiny_model, [{"role": "user", "content": q}], STEPS)
    whole = make_branch(tiny_model, [{"role": "user", "content": q}], ["".join(STEPS)])
    meter = Meter()
    step_tag_prm.score([stepwise, whole], meter)
    assert step_tag_prm.step_scores_of(whole) == pytest.approx(step_tag_prm.step_scores_of(stepwise), abs=1e-5)
    assert len(step_tag_prm.step_scores_of(whole)) == 2
    step_tag_prm.release(lineage(stepwise) + lineage(whole))
    release_policy(tiny_model, [stepwise, whole])


def test_prm_pool_returns_to_its_free_count_after_release_close_and_collection(tiny_model, step_tag_dir):
    prm = PRMVerifier(tiny_model, str(step_tag_dir), dtype="float32", kv_cache_gb=0.02, aggregate="min")
    engine = prm.engine
    free = engine.pool.num_free
    meter = Meter()
    branches = [make_branch(tiny_model, [{"role": "user", "content": f"What is {i} + 1?"}], STEPS) for i in range(3)]
    prm.score(branches, meter)
    assert engine.pool.num_free < free
    prm.release([b for br in branches[:1] for b in lineage(br)])  # released explicitly
    release_policy(tiny_model, branches)
    del branches  # the rest: collected with the policy's branches, swept at the next call
    gc.collect()
    prm.release()
    assert engine.pool.num_free + engine.prefix.num_cached_blocks == engine.pool.num_blocks
    prm.close()
    assert engine.pool.num_free == free == engine.pool.num_blocks


class _TakenAfterTheTest(list):
    """A dead-key list that another worker thread empties right after `while self._dead` saw a key left."""

    def __bool__(self):
        if len(self):
            self.taken.append(list.pop(self))
        return bool(len(self)) or bool(self.taken)


def test_prm_sweep_survives_another_thread_taking_the_last_dead_key(tiny_model, step_tag_dir):
    prm = PRMVerifier(tiny_model, str(step_tag_dir), dtype="float32", kv_cache_gb=0.02)
    dropped = []
    prm._drop = dropped.append
    prm._dead = _TakenAfterTheTest([7, 8])
    prm._dead.taken = []
    prm._sweep()  # popped the list empty itself instead of testing it first: no IndexError
    assert sorted(dropped + prm._dead.taken) == [7, 8] and len(prm._dead) == 0
    prm.close()


def test_prm_refuses_work_the_budget_cannot_pay_for(tiny_model, step_tag_prm):
    branch = make_branch(tiny_model, [{"role": "user", "content": "What is 5 + 5?"}], STEPS)
    free = step_tag_prm.engine.free_blocks()
    meter = Meter(ttc.Budget(tokens=5))
    with pytest.raises(ttc.BudgetExceeded):
        step_tag_prm.score([branch], meter)
    assert meter.ledger.verifier_tokens == 0 and step_tag_prm.engine.free_blocks() == free
    release_policy(tiny_model, [branch])


def test_prm_reports_its_cost_per_branch_and_per_token(step_tag_prm, classifier_prm):
    assert step_tag_prm.cost_per_token == 1.0  # the same tokenizer as the policy
    assert step_tag_prm.cost_per_branch >= len(step_tag_prm.tag_ids) + 1
    assert classifier_prm.cost_per_branch >= 1


# -------------------------------------------------------------------------------------------------
# self-evaluation


def test_yes_and_no_tokens_cover_case_and_leading_space(tiny_model):
    tok = tiny_model.tokenizer
    assert {tok.decode([i]) for i in word_token_ids(tok, "yes")} == {"yes", "Yes", " yes", " Yes"}
    assert {" No", "No", " no", "no"} <= {tok.decode([i]) for i in word_token_ids(tok, "no")}


@pytest.mark.parametrize("chat", [False, True])
def test_self_eval_charges_only_the_question_and_leaves_the_branch_unchanged(tiny_model, chat):
    verifier = SelfEvalVerifier(tiny_model, chat=chat)
    engine = tiny_model.engine
    branches = [make_branch(tiny_model, [{"role": "user", "content": QUESTION}], STEPS),
                make_branch(tiny_model, [{"role": "user", "content": QUESTION}], STEPS, finished=True, eos=True)]
    engine.forward([b.handle for b in branches])
    before = [list(b.handle.token_ids) for b in branches]
    suffixes = [verifier.suffix_ids(b) for b in branches]
    meter = Meter()
    scores = verifier.score(branches, meter)
    assert meter.ledger.verifier_tokens == sum(map(len, suffixes))
    assert meter.ledger.prefill_tokens == 0 and meter.ledger.generated_tokens == 0
    assert all(len(s) <= verifier.cost_per_branch for s in suffixes)
    assert [list(b.handle.token_ids) for b in branches] == before
    for b, s, score in zip(branches, suffixes, scores):  # the same as the question asked from scratch
        full = engine.new_sequence(list(b.handle.token_ids) + s)
        engine.forward([full], cache_prefix=False)
        expect = verifier.yes_probability(torch.log_softmax(full.logits, -1))
        engine.release([full])
        assert 0.0 <= score <= 1.0 and score == pytest.approx(expect, abs=1e-5)
    release_policy(tiny_model, branches)


def test_self_eval_question_does_not_repeat_a_blank_line_or_an_end_of_turn(tiny_model):
    tok = tiny_model.tokenizer
    plain = SelfEvalVerifier(tiny_model, chat=False)
    open_branch = make_branch(tiny_model, "Q", ["Step 1: fine.\n\n"])
    assert tok.decode(plain.suffix_ids(open_branch)).startswith("Is the reasoning above correct so far?")
    chat = SelfEvalVerifier(tiny_model, chat=True)
    done = make_branch(tiny_model, [{"role": "user", "content": "Q"}], ["It is 5."], finished=True, eos=True)
    text = tok.decode(chat.suffix_ids(done))
    assert text.startswith("\n<|im_start|>user\nIs the solution above correct?") and text.endswith("assistant\n")
    release_policy(tiny_model, [open_branch, done])


def test_self_eval_refuses_work_the_budget_cannot_pay_for(tiny_model):
    verifier = SelfEvalVerifier(tiny_model, chat=False)
    branch = make_branch(tiny_model, "Q", ["A.\n\n"])
    meter = Meter(ttc.Budget(tokens=3))
    with pytest.raises(ttc.BudgetExceeded):
        verifier.score([branch], meter)
    assert meter.ledger.verifier_tokens == 0
    release_policy(tiny_model, [branch])


# -------------------------------------------------------------------------------------------------
# probe


def test_logistic_probe_separates_shifted_gaussians_and_auc_counts_ties_half():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (torch.arange(200) % 2).double()
    x[:, 0] += 3 * y
    probe = fit_logistic(x, y, l2=1e-2)
    assert ((probe.predict(x) > 0.5).double() == y).double().mean() > 0.9
    assert roc_auc(torch.tensor([0.1, 0.4, 0.4, 0.9]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.875)
    assert roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])) != roc_auc(torch.tensor([0.1]), torch.tensor([1]))


def _last_token_is_even(model):
    tok = model.tokenizer

    def grade(problem, text):  # a label the model's own tokens decide: separable from its hidden states
        ids = tok.encode(text, add_special_tokens=False)
        return bool(ids) and ids[-1] % 2 == 0
    return grade


def test_probe_fit_save_load_round_trip_gives_identical_scores(tiny_model, tmp_path):
    path = tmp_path / "probe.pt"
    problems = [f"Count to {i}." for i in range(5)]
    probe = ProbeVerifier.fit(tiny_model, problems, _last_token_is_even(tiny_model), samples_per_problem=6,
                              max_tokens=8, path=str(path), seed=0, progress=False, temperature=1.0, chat=False,
                              l2_grid=(1e-3,))
    meta = probe.metadata
    assert meta["rows"] == 30 and set(meta["metrics"]) == {"train", "held_out"} and meta["l2"] == 1e-3
    assert meta["metrics"]["train"]["accuracy"] > 0.9  # 128 features, 24 rows: the labels are separable
    loaded = ProbeVerifier.load(tiny_model, str(path))
    assert loaded.spec == probe.spec and loaded.metadata["l2"] == meta["l2"]
    branches = [make_branch(tiny_model, "Count to 3.", ["1, 2, 3"]), make_branch(tiny_model, "Hi", ["Hello."])]
    meter = Meter()
    scores = probe.score(branches, meter)
    assert loaded.score(branches, Meter()) == scores and all(0.0 <= s <= 1.0 for s in scores)
    assert meter.ledger.verifier_tokens == 2 * len(probe.spec["suffix_ids"]) == 2 * probe.cost_per_branch
    assert meter.ledger.prefill_tokens == 0
    release_policy(tiny_model, branches)
    engine = tiny_model.engine
    assert engine.pool.num_free + engine.prefix.num_cached_blocks == engine.pool.num_blocks


def test_an_interrupted_probe_fit_run_again_samples_only_the_problems_left_and_fits_the_same_probe(tiny_model,
                                                                                                    tmp_path):
    problems = [f"Count to {i}." for i in range(5)]
    grade = _last_token_is_even(tiny_model)
    settings = dict(samples_per_problem=6, max_tokens=8, seed=0, progress=False, temperature=1.0, chat=False,
                    l2_grid=(1e-3,))
    whole = ProbeVerifier.fit(tiny_model, problems, grade, path=str(tmp_path / "whole.pt"), **settings)
    assert not (tmp_path / "whole.pt.rows").exists()  # the rows go once the probe is saved

    graded = []

    def stopped_at_the_fourth(problem, text):
        if problem.id == "train-3":
            raise KeyboardInterrupt
        graded.append(problem.id)
        return grade(problem, text)

    path = tmp_path / "probe.pt"
    with pytest.raises(KeyboardInterrupt):
        ProbeVerifier.fit(tiny_model, problems, stopped_at_the_fourth, path=str(path), **settings)
    assert sorted(f.name for f in (tmp_path / "probe.pt.rows").glob("*.pt")) == ["000000.pt", "000001.pt", "000002.pt"]
    graded.clear()

    def counting(problem, text):
        graded.append(problem.id)
        return grade(problem, text)

    resumed = ProbeVerifier.fit(tiny_model, problems, counting, path=str(path), **settings)
    assert set(graded) == {"train-3", "train-4"}  # the first three problems were not sampled again
    assert resumed.metadata["rows"] == whole.metadata["rows"] == 30
    assert resumed.metadata["ledger"]["generated_tokens"] == whole.metadata["ledger"]["generated_tokens"]
    assert torch.equal(resumed.probe.weight, whole.probe.weight) and not (tmp_path / "probe.pt.rows").exists()
    with pytest.raises(ValueError, match=r"holds samples of another probe training .*: delete it to start over$"):
        (tmp_path / "other.pt.rows").mkdir()
        (tmp_path / "other.pt.rows" / "key.json").write_text("{}")
        ProbeVerifier.fit(tiny_model, problems, grade, path=str(tmp_path / "other.pt"), **settings)


def test_probe_fit_per_step_labels_every_partial_solution(tiny_model):
    problems = [f"List {i} colours." for i in range(4)]
    probe = ProbeVerifier.fit(tiny_model, problems, _last_token_is_even(tiny_model), samples_per_problem=4,
                              max_tokens=12, seed=1, progress=False, temperature=1.0, per_step=True, use_mean=False,
                              l2_grid=(0.1, 1.0))
    assert probe.metadata["rows"] >= 16 and probe.num_features == tiny_model.config.hidden_size


def test_probe_fit_needs_both_correct_and_incorrect_samples(tiny_model):
    with pytest.raises(ValueError, match="both correct and incorrect"):
        ProbeVerifier.fit(tiny_model, ["Hi"], lambda p, t: True, samples_per_problem=2, max_tokens=4, progress=False)


def test_an_untrained_probe_says_how_to_train_one(tiny_model):
    branch = make_branch(tiny_model, "Hi", ["x"])
    with pytest.raises(RuntimeError, match="fit"):
        ProbeVerifier(tiny_model).score([branch], Meter())
    release_policy(tiny_model, [branch])


# -------------------------------------------------------------------------------------------------
# configs


def test_verifier_configs_name_these_classes():
    from pathlib import Path

    from omegaconf import OmegaConf

    folder = Path(__file__).resolve().parents[1] / "configs" / "verifier"
    targets = {name: OmegaConf.load(folder / f"{name}.yaml")["_target_"] for name in ("prm", "self_eval", "probe")}
    assert targets == {"prm": "ttc.verifiers.prm.PRMVerifier", "self_eval": "ttc.verifiers.self_eval.SelfEvalVerifier",
                       "probe": "ttc.verifiers.probe.ProbeVerifier"}


def test_self_eval_config_instantiates_with_the_policy_injected(tiny_model):
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "verifier" / "self_eval.yaml")
    verifier = instantiate(cfg, model=tiny_model)
    assert isinstance(verifier, SelfEvalVerifier) and verifier.cost_per_branch > 0


# -------------------------------------------------------------------------------------------------
# the embedded model


@pytest.fixture(scope="module")
def smollm():
    return ttc.load("smollm2-135m", dtype="float32")  # the reference precision: the same on every CPU


@pytest.mark.slow
def test_embedded_model_self_eval_reads_p_yes_after_each_solution_from_its_reused_kv_within_budget(smollm):
    # No claim that the right answer scores higher: on this pair it did in bfloat16 (P(yes) 0.533 against 0.472)
    # and did not in float32 (0.512 against 0.499), and on 1,600 chain_sum samples self_eval's AUC is 0.37
    # (docs/results.md: its P(yes) follows length). What must hold is the arithmetic and the accounting.
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    right = make_branch(smollm, prompt, ["2 + 3 = 5. The answer is 5."], finished=True, eos=True)
    wrong = make_branch(smollm, prompt, ["2 + 3 = 9. The answer is 9."], finished=True, eos=True)
    smollm.engine.forward([right.handle, wrong.handle])
    verifier = SelfEvalVerifier(smollm)
    budget = ttc.Budget(tokens=int(2 * verifier.cost_per_branch))
    meter = Meter(budget)
    scores = verifier.score([right, wrong], meter)
    for branch, score in zip((right, wrong), scores):  # the same as the question asked from scratch
        full = smollm.engine.new_sequence(list(branch.handle.token_ids) + verifier.suffix_ids(branch))
        smollm.engine.forward([full], cache_prefix=False)
        expect = verifier.yes_probability(torch.log_softmax(full.logits, -1))
        smollm.engine.release([full])
        assert 0.0 < score < 1.0 and score == pytest.approx(expect, abs=1e-4)
    assert abs(scores[0] - scores[1]) > 1e-3  # the score reads the solution, not only the question
    # only the two questions are computed: the solutions' KV is reused, nothing is generated
    asked = len(verifier.suffix_ids(right)) + len(verifier.suffix_ids(wrong))
    assert meter.ledger.verifier_tokens == meter.ledger.total_tokens == asked <= budget.tokens
    assert meter.ledger.prefill_tokens == meter.ledger.generated_tokens == 0
    release_policy(smollm, [right, wrong])


def test_the_shipped_probe_is_for_the_embedded_model_and_records_how_it_was_trained():
    from ttc.verifiers.probe import FORMAT_VERSION, shipped_probe_path

    path = shipped_probe_path("smollm2-135m")
    assert path is not None and shipped_probe_path("no-such-model") is None
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["format"] == FORMAT_VERSION and state["model"] == "smollm2-135m"
    assert state["weights"].shape == (2 * state["feature"]["hidden_size"],) == (1152,)
    meta = state["metadata"]
    assert meta["command"].startswith("python -m ttc.evals.fit_probe") and meta["ledger"]["generated_tokens"] > 0
    assert 0.0 <= meta["metrics"]["held_out"]["auc"] <= 1.0


@pytest.mark.slow
def test_verifier_probe_without_a_path_loads_the_shipped_probe_and_reports_its_training_cost(smollm):
    from ttc.evals.build import build_verifier, training_cost
    from ttc.verifiers.probe import shipped_probe_path

    cfg = {"verifier": {"_target_": "ttc.verifiers.probe.ProbeVerifier", "path": None, "batch_size": 8},
           "model": {"spec": "smollm2-135m"}, "dataset": {}}
    verifier = build_verifier(cfg, smollm, {"verifier": "probe"})
    shipped = torch.load(shipped_probe_path("smollm2-135m"), weights_only=True)["metadata"]
    assert (verifier.metadata["created"], verifier.metadata["command"]) == (shipped["created"], shipped["command"])
    assert training_cost(verifier).generated_tokens == verifier.metadata["ledger"]["generated_tokens"]
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    branch = make_branch(smollm, prompt, ["2 + 3 = 5. The answer is 5."], finished=True, eos=True)
    smollm.engine.forward([branch.handle])
    (score,) = verifier.score([branch], Meter())
    assert 0.0 < score < 1.0
    release_policy(smollm, [branch])
