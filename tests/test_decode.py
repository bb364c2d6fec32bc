"""Decoding: argument checks, and a Simba-pruned prefill against the dense computation it stands for."""

import pytest
import torch

from simba_cli.errors import UserError
from simba_cli.models.decode import DecodeState, generate, prefill, step
from simba_cli.simba.pruned import pruned_forward, pruned_prefill
from simba_cli.simba.settings import PruneConfig
from tests.conftest import random_model, tiny_config, tiny_model_of
from tests.test_simba import FAMILIES, dense_on_gathered


@pytest.mark.parametrize("kw,msg", [
    (dict(max_new_tokens=0), r"max_new_tokens must be at least 1, got 0"),
    (dict(max_new_tokens=-3), r"max_new_tokens must be at least 1, got -3"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(top_p=float("nan")), r"top_p must be in \(0, 1\], got nan"),
    (dict(temperature=-0.5), r"temperature must be at least 0 \(0 is greedy\), got -0.5"),
    (dict(temperature=float("nan")), r"temperature must be at least 0 \(0 is greedy\), got nan"),
    (dict(top_k=-1), r"top_k must be an integer of at least 0, got -1"),
])
def test_generate_rejects_bad_arguments(kw, msg):
    model = random_model(tiny_config(n_layer=2))
    ids = torch.randint(0, 64, (1, 5))
    with pytest.raises(UserError, match=msg):
        generate(model, ids, **{"max_new_tokens": 2, **kw})


def test_generate_accepts_the_edges():
    model = random_model(tiny_config(n_layer=2))
    ids = torch.randint(0, 64, (1, 5))
    gen = torch.Generator().manual_seed(0)
    assert generate(model, ids, 1, top_p=1.0, temperature=0.0).shape == (1, 1)
    # top_p that keeps only the most likely token: sampling is greedy decoding
    assert torch.equal(generate(model, ids, 3, top_p=1e-6, temperature=0.7, generator=gen), generate(model, ids, 3))


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_prefill_keeping_every_token_generates_what_the_dense_prefill_does(family):
    model = tiny_model_of(family, n_layer=4)
    ids = torch.randint(0, 64, (3, 21), generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([21, 9, 16])
    keep_all = pruned_prefill(PruneConfig(schedule="linear", final_keep=1.0))
    dense = generate(model, ids, 12, lengths, prefill_fn=prefill)
    pruned = generate(model, ids, 12, lengths, prefill_fn=keep_all)
    assert torch.equal(pruned, dense)
    with torch.no_grad():
        dense_logits, dense_state = prefill(model, ids, lengths)
        pruned_logits, pruned_state = keep_all(model, ids, lengths)
    torch.testing.assert_close(pruned_logits, dense_logits, rtol=1e-6, atol=1e-6)
    for i in range(4):
        torch.testing.assert_close(pruned_state.conv[i], dense_state.conv[i], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(pruned_state.ssm[i], dense_state.ssm[i], rtol=1e-6, atol=1e-6)


def recording(mix, seen: list):
    """mix, recording the hidden states it is given: the (normed) sequence entering a layer's mixer."""
    def wrapped(hidden, lengths=None, **kw):
        seen.append(hidden)
        return mix(hidden, lengths, **kw)
    return wrapped


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("criterion", ["simba", "recent"])
def test_decode_state_after_a_pruned_prefill_is_each_layers_state_on_the_tokens_it_kept(monkeypatch, criterion,
                                                                                        family):
    """Layer l's state after a pruned, padded, batched prefill is its mixer's final state on the sequence
    entering it in the hand-built pruned computation of tests.test_simba (one sequence, no padding, the
    tokens the trace says layer l kept); and each of four decoding steps from that state is that
    computation with the new tokens so far appended to every layer's tokens."""
    model = tiny_model_of(family, n_layer=4)
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(6))
    lengths = torch.tensor([30, 19])
    new = torch.tensor([[7, 3, 9, 1], [11, 2, 5, 8]])
    with torch.no_grad():
        out = pruned_forward(model, ids, PruneConfig(final_keep=0.2, criterion=criterion), lengths,
                             final_state=True, trace=True)
        # A step updates the state in place: step a copy, keep the prefill's own state to compare.
        state = DecodeState([c.clone() for c in out.state.conv], [s.clone() for s in out.state.ssm])
        stepped = [step(model, new[:, j], state) for j in range(4)]
    mixers = [block.mixer for block in model.layers]
    plain = [m.mix for m in mixers]
    for b, n in enumerate(lengths.tolist()):
        kept = [k[b][k[b] >= 0] for k in out.kept]
        assert len(kept[-1]) < len(kept[1]) < n, "pruned more than once"
        entering = [[] for _ in mixers]
        for m, mix, seen in zip(mixers, plain, entering):
            monkeypatch.setattr(m, "mix", recording(mix, seen))
        with torch.no_grad():
            ref_logits = dense_on_gathered(model, ids[b, :n], kept, criterion, forced=[n - 1])
        monkeypatch.undo()
        torch.testing.assert_close(out.logits[b, :n], ref_logits, rtol=1e-4, atol=1e-4)
        for i, (mix, seen) in enumerate(zip(plain, entering)):
            assert len(seen) == 1 and seen[0].shape[1] == len(kept[i])
            with torch.no_grad():
                ref = mix(seen[0], final_state=True)
            torch.testing.assert_close(out.state.conv[i][b], ref.conv_state[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.state.ssm[i][b], ref.ssm_state[0].float(), rtol=1e-5, atol=1e-5)
        # The new tokens at positions n, n + 1, ... are seen by every layer ("random": no choice to check).
        for j in range(4):
            longer = torch.cat([ids[b, :n], new[b, :j + 1]])
            appended = [torch.cat([k, torch.arange(n, n + j + 1)]) for k in kept]
            with torch.no_grad():
                ref_next = dense_on_gathered(model, longer, appended, "random")
            torch.testing.assert_close(stepped[j][b], ref_next[-1], rtol=1e-4, atol=1e-4)


def test_sampling_draws_from_the_filtered_softmax():
    """top_k = 1 and a tiny top_p are greedy; top_k / top_p never draw outside the kept set; temperature 1
    draws each token about as often as its softmax probability; the same generator seed, the same draws."""
    from simba_cli.models.decode import sample_next

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(4000, 1)
    probs = torch.softmax(logits[0], -1)

    def gen():
        return torch.Generator().manual_seed(3)

    greedy = torch.zeros(4000, dtype=torch.long)
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=gen()), greedy)
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6, generator=gen()), greedy)
    assert set(sample_next(logits, 1.0, top_k=2, generator=gen()).tolist()) == {0, 1}
    # top_p 0.8: the smallest set whose probability reaches 0.8 (here the first three tokens, 0.86)
    assert float(probs[:2].sum()) < 0.8 <= float(probs[:3].sum())
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=gen()).tolist()) == {0, 1, 2}
    draws = sample_next(logits, 1.0, generator=gen())
    freq = torch.bincount(draws, minlength=5).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)
    assert torch.equal(draws, sample_next(logits, 1.0, generator=gen()))
    hot = torch.bincount(sample_next(logits, 3.0, generator=gen()), minlength=5).float() / 4000
    assert hot[0] < freq[0] - 0.1  # a higher temperature flattens the distribution


def test_generations_count_is_the_prefill_that_ran_and_one_token_a_step(monkeypatch):
    """What generate reports: the pruned prefill's FLOPs as its forward measured them, plus every decoding step
    (one token through every layer and the head) beside it."""
    from simba_cli.models.loading import LoadedModel
    from simba_cli.simba import pruned as pruned_module
    from simba_cli.simba.flops import count_head, count_layer
    from simba_cli.simba.runner import ModelRunner

    model = random_model(tiny_config(n_layer=4)).eval()
    tokenizer = type("Tok", (), {"eos_token_id": None})()
    runner = ModelRunner(LoadedModel(model, tokenizer, "tiny", None, "hf"), PruneConfig(final_keep=0.3))
    from simba_cli.models import decode

    seen, steps_run = [], []
    real, real_step = pruned_module.pruned_forward, decode.step
    monkeypatch.setattr(pruned_module, "pruned_forward", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    monkeypatch.setattr(decode, "step", lambda *a, **k: steps_run.append(1) or real_step(*a, **k))
    ids = torch.randint(1, 64, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    new = runner.generate_ids(ids, 5)
    assert len(new) == 5 and len(seen) == 1 and len(steps_run) == 4  # the 5th token needs no step after it
    steps = 4 * (model.cfg.n_layer * count_layer(model.cfg, 1) + count_head(model.cfg, 1))
    assert runner.flops.total == seen[0].flops.total + steps
