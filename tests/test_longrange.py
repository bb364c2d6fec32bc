"""Long-range recall: training documents from training text only, evaluation tasks from evaluation text
only, both deterministic; the recipe's mix, the curriculum and the answer weights."""

import json
import random
import re

import pytest
import torch

from simba_cli.data import corpus
from simba_cli.data.longrange import KEYS, VALUES, RecallMix, RecallSampler, answer_text, query_prefix
from simba_cli.train import loop
from simba_cli.train.recipe import recipe_from_dict


@pytest.fixture(scope="module")
def marked_corpus(tmp_path_factory):
    """30 documents, each of one marker word repeated: which split a piece of text came from is visible."""
    folder = tmp_path_factory.mktemp("marked")
    for i in range(30):
        word = f"mark{chr(97 + i // 26)}{chr(97 + i % 26)}"
        (folder / f"d{i:02d}.txt").write_text((" ".join([word] * 12) + "\n") * 60)
    splits = {s: {d.split()[0] for d in corpus.load_texts(str(folder), s)} for s in corpus.SPLITS}
    return folder, splits


def _marks(text: str) -> set[str]:
    """The marker words in a text (whole ones: filler is cut at token boundaries, so its ends are partial)."""
    return set(re.findall(r"\bmark[a-z]{2}\b", text))


def _recipe(folder, **recall):
    return recipe_from_dict({
        "name": "recall", "model": {"d_model": 16, "n_layer": 2, "d_state": 4}, "tokenizer": {"vocab_size": 400},
        "data": {"source": str(folder), "seq_len": 256, "val_tokens": 512,
                 "recall": {"share": 1.0, "pairs": [4], **recall}},
        "train": {"steps": 2, "batch_size": 4, "eval_every": 1000, "checkpoint_every": 1000}})


def test_recall_training_documents_read_training_text_only(marked_corpus, tmp_path):
    folder, splits = marked_corpus
    run = loop.setup(_recipe(folder, curriculum_steps=10), tmp_path / "run", None, False, False, "cpu")
    sampler = RecallSampler(run.tokenizer, run.train_stream, 257, run.recipe.data.recall)
    seen = set()
    for step in range(12):
        tokens, mask = sampler.row(random.Random(step), run.recipe.data.recall.reach_at(step))
        assert tokens.shape == mask.shape == (257,) and mask.any()
        seen |= _marks(run.tokenizer.decode(tokens.tolist()))
    assert seen and seen <= splits["train"]
    held_out = {w for docs in run.val_recall.values() for t, _ in docs
                for w in _marks(run.tokenizer.decode(t.tolist()))}
    assert held_out and held_out <= splits["validation"]  # the recall measured during training: validation text


def test_recall_documents_are_what_they_say(marked_corpus, tmp_path):
    """Every query's answer is the value its fact stated earlier, and the mask marks exactly the answers."""
    folder, _ = marked_corpus
    run = loop.setup(_recipe(folder), tmp_path / "run", None, False, False, "cpu")
    sampler = RecallSampler(run.tokenizer, run.train_stream, 300, RecallMix(passkey=0, mqar=1, pairs=(4,)))
    tokens, mask = sampler.document(random.Random(7))
    text = run.tokenizer.decode(tokens.tolist())
    facts = dict(line[len("Remember: the "):-1].split(" is ") for line in text.splitlines()
                 if line.startswith("Remember: the "))
    queries = [line[len("Recall: the "):-1].split(" is ") for line in text.splitlines() if line.startswith("Recall:")]
    assert len(facts) == 4 and len(queries) == 4 and all(facts[k] == v for k, v in queries)
    assert all(k in KEYS and v in VALUES for k, v in queries)
    assert run.tokenizer.decode(tokens[mask].tolist()).split() == [v for _, v in queries]


def test_curriculum_packs_short_documents_first(marked_corpus, tmp_path):
    folder, _ = marked_corpus
    run = loop.setup(_recipe(folder, curriculum_steps=100, shortest=128), tmp_path / "run", None, False, False, "cpu")
    sampler = RecallSampler(run.tokenizer, run.train_stream, 257, run.recipe.data.recall)
    reach = run.recipe.data.recall.reach_at
    early, late = (run.tokenizer.decode(sampler.row(random.Random(1), reach(s))[0].tolist())
                   for s in (0, 100))
    assert early.count("Recall:") > late.count("Recall:") >= 1


def test_the_lead_trains_answers_alone_then_the_answers_mean_is_added(marked_corpus, tmp_path):
    folder, _ = marked_corpus
    recipe = _recipe(folder, share=0.0, lead_steps=2, curriculum_steps=100, answer_loss=3.0)
    run = loop.setup(recipe, tmp_path / "run", None, False, False, "cpu")
    from simba_cli.data.tokens import BatchSampler

    mix = recipe.data.recall
    sampler = BatchSampler(run.train_stream, 256, 4, 0, RecallSampler(run.tokenizer, run.train_stream, 257, mix))
    assert mix.leading(sampler.draws)
    lead_batch, lead_answers = sampler.next()
    rows, n = mix.lead_shape(0, 256, 4)
    assert lead_batch.shape == (rows, n + 1) and lead_answers.shape == (rows, n) and rows > 4 and n < 256
    # in the lead every row is one short recall document, though share is 0
    assert all(run.tokenizer.decode(row.tolist()).count("Recall:") == 1 for row in lead_batch)
    assert lead_answers.any(1).all()
    sampler.next()
    assert not mix.leading(sampler.draws)
    batch, answers = sampler.next()
    assert not answers.any()  # share 0: after the lead, play windows only

    def ce(b):
        return torch.nn.functional.cross_entropy(run.model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten(),
                                                 reduction="none")

    per_token, is_answer = ce(lead_batch), lead_answers.flatten()
    torch.testing.assert_close(run.loss_fn(run.model, lead_batch, lead_answers, (0.0, 1.0))[0],
                               per_token[is_answer].mean())
    torch.testing.assert_close(run.loss_fn(run.model, lead_batch, lead_answers, (1.0, 3.0))[0],
                               per_token[~is_answer].mean() + 3 * per_token[is_answer].mean())
    torch.testing.assert_close(run.loss_fn(run.model, batch, answers, (1.0, 3.0))[0], ce(batch).mean())


def test_the_curriculum_runs_from_the_first_step_and_the_lead_rows_grow_with_it():
    assert [RecallMix(curriculum_from=5, curriculum_steps=10).reach_at(s) for s in (0, 5, 10, 15, 99)] == [
        0.0, 0.0, 0.5, 1.0, 1.0]
    mix = RecallMix(lead_steps=30, lead_len=256, curriculum_steps=20, shortest=64)
    assert [mix.reach_at(s) for s in (0, 10, 20, 99)] == [0.0, 0.5, 1.0, 1.0]
    # one document a row, batch_size rows of lead_len tokens' worth while they are shorter, a whole row at most
    assert [mix.lead_shape(s, 1024, 4) for s in (0, 1, 10, 20)] == [(16, 64), (16, 64), (4, 512), (4, 1024)]
    assert mix.lead_shape(2, 2048, 4) == (4, int(0.1 * 2048))
    assert RecallMix().reach_at(0) == 1.0  # no curriculum: whole rows from the start


def test_long_range_tasks_are_deterministic_and_read_evaluation_plays_only(tmp_path, monkeypatch):
    from simba_cli.eval import tasks

    asked = []
    real = corpus.load_texts

    def recording(source, split="train", *a, **k):
        asked.append(split)
        return real(source, split, *a, **k)

    monkeypatch.setattr(corpus, "load_texts", recording)
    a = tasks.build_tasks(n=40, root=tmp_path / "a")
    b = tasks.build_tasks(n=40, root=tmp_path / "b")
    assert set(asked) == {"evaluation"}
    for name in tasks.ALL_TASKS:
        assert (a / f"{name}.jsonl").read_text() == (b / f"{name}.jsonl").read_text(), name
    docs = [json.loads(x) for x in (a / "simba_passkey.jsonl").read_text().splitlines()]
    cells = {(d["length"], d["depth"]) for d in docs[:20]}  # the first 20 documents cover every setting
    assert cells == {(n, d) for n in tasks.PASSKEY_LENGTHS for d in tasks.PASSKEY_DEPTHS}
    for d in docs:
        assert d["context"].endswith(query_prefix("pass key")) and d["choices"][d["label"]] == d["answer"]
        assert f"the pass key is {d['answer']}." in d["context"] and 0 < d["recent_drops_fact_below"] <= 1.1
        assert abs(d["tokens"] - d["length"]) <= 0.15 * d["length"]
    deep = [d for d in docs if d["depth"] == 0.0]
    assert all(d["recent_drops_fact_below"] > 0.8 for d in deep)  # a key at the start: only near-dense reaches it
    mqar = [json.loads(x) for x in (a / "simba_mqar.jsonl").read_text().splitlines()]
    for d in mqar:
        assert f"Remember: the {d['context'].rsplit('the ', 1)[1][:-3]} is {d['answer']}." in d["context"]
        assert d["context"].endswith(query_prefix(d["context"].rsplit("the ", 1)[1][:-3]))
    assert answer_text("noble") == " noble."


def test_the_ladder_recipes_step_at_most_1_5x_and_each_rung_reaches_the_one_below(tmp_path):
    """`make zoo`'s rungs: at least five, FLOPs per token at most 1.5x apart, and `flops-match` finds a
    linear schedule at which each pruned rung costs what the rung below costs dense (1024 tokens)."""
    from typer.testing import CliRunner

    from simba_cli.cli import app
    from simba_cli.models.checkpoint import save_checkpoint
    from simba_cli.models.config import MambaConfig
    from simba_cli.models.mamba import MambaLM
    from simba_cli.simba.flops import dense_flops_per_token
    from simba_cli.train.recipe import load_recipe
    from tests.test_defects import ROOT

    names = ROOT.joinpath("Makefile").read_text().split("ZOO := ")[1].splitlines()[0].split()
    rungs = []
    for name in names:
        m = load_recipe(ROOT / "recipes" / f"{name}.yaml").model
        cfg = MambaConfig(d_model=m.d_model, n_layer=m.n_layer, vocab_size=2048, d_state=m.d_state, expand=m.expand,
                          d_conv=m.d_conv)
        rungs.append((save_checkpoint(MambaLM(cfg), tmp_path / name), dense_flops_per_token(cfg)))
    assert len(rungs) >= 5
    for (small, f_small), (big, f_big) in zip(rungs, rungs[1:]):
        assert 1.0 < f_big / f_small <= 1.5
        r = CliRunner().invoke(app, ["flops-match", str(big), "--target", str(small), "--seq-len", "1024"])
        assert r.exit_code == 0 and r.output.startswith("final_keep = "), r.output


def test_recall_accuracy_counts_whole_answers(marked_corpus, tmp_path):
    """An oracle that always predicts the next token scores 1; one that misses one digit of each pass key
    scores 0 per answer but most of its tokens."""
    from simba_cli.data.longrange import recall_accuracy

    folder, _ = marked_corpus
    run = loop.setup(_recipe(folder), tmp_path / "run", None, False, False, "cpu")
    sampler = RecallSampler(run.tokenizer, run.train_stream, 300, RecallMix())
    docs = sampler.fixed("passkey", 4, seed=0) + sampler.fixed("mqar", 4, seed=1, pairs=4)
    vocab = len(run.tokenizer)

    def oracle(inputs, spoil_last_digit=False):
        full = {tuple(d[0][:-1].tolist()): d for d in docs}
        out = []
        for row in inputs:
            tokens, mask = full[tuple(row.tolist())]
            target = tokens[1:].clone()
            if spoil_last_digit:  # the last token of each answer run
                ends = mask[1:] & ~torch.cat([mask[2:], torch.tensor([False])])
                target[ends] = (target[ends] + 1) % vocab
            out.append(torch.nn.functional.one_hot(target, vocab).float())
        return torch.stack(out)

    assert recall_accuracy(oracle, docs) == {"recall_token_acc": 1.0, "recall_acc": 1.0}
    spoiled = recall_accuracy(lambda x: oracle(x, True), docs)
    assert spoiled["recall_acc"] == 0.0 and 0.4 < spoiled["recall_token_acc"] < 1.0


def test_every_key_and_value_is_one_token_of_the_zoo_tokenizer():
    """Answers are one token (a query is answered by one greedy step); the facts' keys too."""
    from simba_cli.data.bpe import cached_bpe
    from simba_cli.data.longrange import PASSKEY_VALUES

    tokenizer = cached_bpe(corpus.load_texts("shakespeare", "train"), 2048)  # the zoo recipes' tokenizer
    words = KEYS + VALUES + PASSKEY_VALUES
    assert len(set(words)) == len(words) and len(PASSKEY_VALUES) == len(VALUES) == 32
    assert [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) != 1] == []
