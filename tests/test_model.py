"""The model against transformers' MambaForCausalLM (the oracle), in both checkpoint formats."""

import json
import re

import pytest
import torch
from transformers import MambaForCausalLM

from simba_cli.errors import UserError
from simba_cli.models.checkpoint import load_checkpoint, save_checkpoint
from simba_cli.models.decode import generate, prefill, step
from simba_cli.simba.flops import layer_flops_per_token
from simba_cli.simba.settings import PruneConfig
from tests.conftest import random_model, tiny_config


@pytest.mark.parametrize("fmt", ["hf", "mamba_ssm"])
def test_logits_equal_transformers(tmp_path, fmt, projections):
    model = random_model(tiny_config(vocab_size=72))
    hf_dir = save_checkpoint(model, tmp_path / "hf", fmt="hf")
    ours_dir = save_checkpoint(model, tmp_path / f"ours-{fmt}", fmt=fmt)
    oracle = MambaForCausalLM.from_pretrained(hf_dir).eval()
    ours = load_checkpoint(ours_dir).eval()
    ids = torch.randint(0, 72, (2, 23))
    with torch.no_grad():
        expected = oracle(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_step_by_step_decoding_equals_parallel_forward(tiny_model, projections):
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        full = tiny_model(ids)
        logits, state = prefill(tiny_model, ids[:, :5])
        outs = [logits]
        for t in range(5, 12):
            outs.append(step(tiny_model, ids[:, t], state))
    torch.testing.assert_close(torch.stack(outs, 1), full[:, 4:], rtol=1e-4, atol=1e-4)


def test_prefill_with_padding_matches_unpadded(tiny_model):
    ids = torch.randint(0, 64, (2, 10))
    lengths = torch.tensor([10, 3])
    with torch.no_grad():
        _, state = prefill(tiny_model, ids, lengths)
        _, alone = prefill(tiny_model, ids[1:, :3])
        nxt = torch.tensor([5, 7])
        got = step(tiny_model, nxt, state)[1]
        want = step(tiny_model, nxt[1:], alone)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_greedy_generate_matches_argmax_of_forward(tiny_model):
    ids = torch.randint(0, 64, (1, 6))
    new = generate(tiny_model, ids, max_new_tokens=5)
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, tiny_model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(new, seq[:, 6:])


@pytest.mark.parametrize("family", ["mamba", "falcon_mamba"])
def test_greedy_generation_of_right_padded_prompts_equals_transformers(tmp_path, family, projections):
    """The oracle generates each prompt alone (it has no right padding); ours, the padded batch at once."""
    from transformers import FalconMambaForCausalLM

    oracle, directory = hf_oracle(tmp_path, MambaForCausalLM if family == "mamba" else FalconMambaForCausalLM)
    ours = load_checkpoint(directory).eval()
    lengths = torch.tensor([19, 7, 12])
    ids = torch.randint(1, 64, (3, 19), generator=torch.Generator().manual_seed(4))
    ids = torch.where(torch.arange(19)[None, :] < lengths[:, None], ids, 0)
    new = generate(ours, ids, 10, lengths)
    for b, n in enumerate(lengths.tolist()):
        prompt = ids[b:b + 1, :n]
        with torch.no_grad():
            want = oracle.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                                   min_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert new[b].tolist() == want[0, n:].tolist()


def test_missing_truncated_and_mismatched_checkpoints(tmp_path, tiny_model):
    with pytest.raises(UserError, match="config.json is missing"):
        load_checkpoint(tmp_path)
    d = save_checkpoint(tiny_model, tmp_path / "m", fmt="hf")
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="model.safetensors.*truncated or corrupt"):
        load_checkpoint(d)
    other = save_checkpoint(random_model(tiny_config(n_layer=2)), tmp_path / "o", fmt="mamba_ssm")
    (other / "config.json").write_text((save_checkpoint(tiny_model, tmp_path / "p", fmt="mamba_ssm")
                                        / "config.json").read_text())
    with pytest.raises(UserError, match="missing keys backbone.layers.2"):
        load_checkpoint(other)


def test_save_refuses_to_overwrite(tmp_path, tiny_model):
    save_checkpoint(tiny_model, tmp_path / "m")
    with pytest.raises(UserError, match="already exists"):
        save_checkpoint(tiny_model, tmp_path / "m")


def hf_oracle(tmp_path, model_class=MambaForCausalLM, name="oracle", **kw):
    """A transformers Mamba-family model with random weights (norms, D and biases too), saved in its format."""
    torch.manual_seed(0)
    cfg = model_class.config_class(**{"hidden_size": 16, "num_hidden_layers": 2, "vocab_size": 64, "state_size": 4,
                                      **kw})
    oracle = model_class(cfg).eval()
    with torch.no_grad():
        for param_name, p in oracle.named_parameters():
            if "norm" in param_name or param_name.endswith(".D") or "bias" in param_name:
                p.add_(0.1 * torch.randn_like(p))
    oracle.save_pretrained(tmp_path / name)
    return oracle, tmp_path / name


def assert_same_logits(ours, oracle, vocab=64):
    ids = torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), oracle(ids).logits, rtol=1e-4, atol=1e-4)


def test_hf_intermediate_size_other_than_expand_times_hidden(tmp_path):
    oracle, directory = hf_oracle(tmp_path, intermediate_size=40)
    assert oracle.backbone.layers[0].mixer.intermediate_size == 40
    ours = load_checkpoint(directory).eval()
    assert ours.cfg.d_inner == 40
    assert_same_logits(ours, oracle)
    assert layer_flops_per_token(ours.cfg)["out_proj"] == 2 * 40 * 16
    # Saved again in HF format, the inner size goes with it; mamba-ssm's config has no way to say it.
    again = save_checkpoint(ours, tmp_path / "again", fmt="hf")
    assert json.loads((again / "config.json").read_text())["intermediate_size"] == 40
    assert_same_logits(load_checkpoint(again).eval(), oracle)
    with pytest.raises(UserError, match="cannot hold d_inner 40.*save this model in hf format"):
        save_checkpoint(ours, tmp_path / "ssm", fmt="mamba_ssm")


def test_hf_time_step_rank_auto(tmp_path):
    oracle, directory = hf_oracle(tmp_path, hidden_size=40)
    config = json.loads((directory / "config.json").read_text())
    config["time_step_rank"] = "auto"  # as some hub configs spell it: ceil(hidden_size / 16)
    (directory / "config.json").write_text(json.dumps(config))
    ours = load_checkpoint(directory).eval()
    assert ours.cfg.dt_rank == 3
    assert_same_logits(ours, oracle)
    config["time_step_rank"] = "big"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="time_step_rank must be a positive integer or \"auto\", got 'big'"):
        load_checkpoint(directory)


@pytest.mark.parametrize("fmt", ["hf", "mamba_ssm"])
def test_prune_checks_that_the_weights_load(tmp_path, tiny_model, fmt):
    from simba_cli.simba.artifact import prune_model

    config = PruneConfig(final_keep=0.5)
    name = "model.safetensors" if fmt == "hf" else "pytorch_model.bin"
    good = save_checkpoint(tiny_model, tmp_path / "good", fmt=fmt)
    body = prune_model(str(good), tmp_path / "out", config, seq_len=64)
    assert body["model"] == tiny_model.cfg.to_dict()

    missing = save_checkpoint(tiny_model, tmp_path / "missing", fmt=fmt)
    (missing / name).unlink()
    with pytest.raises(UserError, match=f"no weights in {re.escape(str(missing))}: .*re-download or re-save"):
        prune_model(str(missing), tmp_path / "x", config)

    truncated = save_checkpoint(tiny_model, tmp_path / "truncated", fmt=fmt)
    (truncated / name).write_bytes((truncated / name).read_bytes()[:100])
    with pytest.raises(UserError, match=f"cannot read {re.escape(str(truncated / name))} .*truncated or corrupt"):
        prune_model(str(truncated), tmp_path / "x", config)

    wider = save_checkpoint(random_model(tiny_config(d_model=48)), tmp_path / "wider", fmt=fmt)
    (wider / "config.json").write_text((good / "config.json").read_text())  # says d_model 32
    with pytest.raises(UserError, match=r"wider/.* does not fit its config.json: shape mismatch "
                                        r"backbone.embedding.weight \(64, 48\) != \(64, 32\)"):
        prune_model(str(wider), tmp_path / "x", config)
    assert not (tmp_path / "x").exists(), "no artifact for a base that does not load"


def test_a_sharded_index_naming_a_missing_shard(tmp_path, tiny_model):
    d = save_checkpoint(tiny_model, tmp_path / "m", fmt="hf")
    index = {"metadata": {}, "weight_map": {"backbone.embeddings.weight": "model.safetensors",
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="names weight files that are missing: model-00002-of-00002.safetensors"):
        load_checkpoint(d)
    (d / "model.safetensors.index.json").write_text("{")
    with pytest.raises(UserError, match="is not a valid weight index"):
        load_checkpoint(d)


def test_falcon_mamba_equals_transformers(tmp_path):
    """Falcon-Mamba is Mamba-1 with weightless RMS norms on dt, B and C: logits, decoding, saving again,
    and a pruned forward keeping every token, against transformers' FalconMambaForCausalLM."""
    from transformers import FalconMambaForCausalLM

    from simba_cli.simba.pruned import pruned_forward

    oracle, directory = hf_oracle(tmp_path, FalconMambaForCausalLM, "falcon", hidden_size=32, num_hidden_layers=3,
                                  state_size=8, mixer_rms_eps=1e-6)
    ours = load_checkpoint(directory).eval()
    assert ours.cfg.bcdt_rms and ours.cfg.mixer_rms_eps == 1e-6
    assert_same_logits(ours, oracle)
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(ids)
        logits, state = prefill(ours, ids[:, :9])
        steps = [step(ours, ids[:, t], state) for t in range(9, 17)]
        torch.testing.assert_close(torch.stack(steps, 1)[:, :-1], full[:, 9:-1], rtol=1e-4, atol=1e-4)
        kept_all = pruned_forward(ours, ids, PruneConfig(final_keep=1.0))
        torch.testing.assert_close(kept_all.logits, full)
        # the criterion reads the scan's own inputs: the normalised B and C (unit RMS over the state)
        scan = ours.layers[0].mixer.mix(ours.embed(ids), keep_scan_inputs=True).scan
        for x in (scan.B, scan.C):
            torch.testing.assert_close(x.pow(2).mean(-1), torch.ones(2, 17), rtol=0, atol=1e-2)  # eps aside
    again = save_checkpoint(ours, tmp_path / "again", fmt="hf")
    assert json.loads((again / "config.json").read_text())["model_type"] == "falcon_mamba"
    assert_same_logits(load_checkpoint(again).eval(), oracle)
    with pytest.raises(UserError, match="no Falcon-Mamba variant"):
        save_checkpoint(ours, tmp_path / "ssm", fmt="mamba_ssm")


# mamba-ssm 2.x's MambaConfig, a plain dataclass: MambaLMHeadModel.from_pretrained builds it from config.json with
# MambaConfig(**config), so any other key is a TypeError there
MAMBA_SSM_CONFIG_FIELDS = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
                           "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple",
                           "tie_embeddings"}


def test_mamba_ssm_configs_hold_only_what_mamba_ssm_reads(tmp_path):
    import dataclasses

    from simba_cli.models.mamba2_config import Mamba2Config

    one = random_model(tiny_config(n_layer=2))
    assert set(one.cfg.to_mamba_ssm()) <= MAMBA_SSM_CONFIG_FIELDS
    assert set(Mamba2Config(d_model=32, n_layer=2, vocab_size=64, d_state=8, head_dim=8).to_mamba_ssm()) \
        <= MAMBA_SSM_CONFIG_FIELDS
    # a norm epsilon mamba-ssm cannot hold is refused, not dropped
    odd = dataclasses.replace(one.cfg, norm_eps=1e-6)
    with pytest.raises(UserError, match="norm epsilon 1e-06.*hf format"):
        odd.to_mamba_ssm()


def _fake_hub_repo(cache, repo_id: str, model, fmt: str):
    """A repo as huggingface_hub's cache holds it: models--org--name/{refs/main, snapshots/<commit>/...}."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    save_checkpoint(model, folder / "snapshots" / commit, fmt=fmt)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def test_hub_ids_load_from_the_hub_cache_offline(tmp_path, monkeypatch):
    """The hub path itself, offline: snapshot_download finds a repo in a pre-filled cache (HF_HUB_CACHE), in either
    checkpoint format, and the model loads with the same logits as the directory it was saved from."""
    from huggingface_hub import constants

    from simba_cli.models.loading import load_model

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = random_model(tiny_config(n_layer=2)).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (1, 12))
    for repo_id, fmt in (("simba-test/tiny-hf", "hf"), ("simba-test/tiny", "mamba_ssm")):
        _fake_hub_repo(tmp_path, repo_id, model, fmt)
        loaded = load_model(repo_id, with_tokenizer=False).model
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    with pytest.raises(UserError, match="not in the local hub cache"):
        load_model("simba-test/absent", with_tokenizer=False)
    # a hub id's fingerprint is its cached snapshot's files: other weights under the same id, another one
    from simba_cli.provenance import model_fingerprint

    before = model_fingerprint("simba-test/tiny-hf")
    assert before != "simba-test/tiny-hf" and model_fingerprint("simba-test/absent") == "simba-test/absent"
    _fake_hub_repo(tmp_path / "other", "simba-test/tiny-hf", random_model(tiny_config(n_layer=2), seed=9), "hf")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "other"))
    assert model_fingerprint("simba-test/tiny-hf") != before


def test_hub_downloads_fetch_one_weight_format(tmp_path, monkeypatch):
    from simba_cli.models import hub

    asked = []

    def fake_download(repo_id, patterns, what="model"):
        asked.append(patterns)
        return tmp_path / repo_id.split("/")[1]

    monkeypatch.setattr(hub, "download", fake_download)
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "model-00001-of-00002.safetensors").write_bytes(b"")
    (tmp_path / "bin").mkdir()
    hub.resolve("org/st")
    assert len(asked) == 1 and not any(p.endswith(".bin") for p in asked[0])
    asked.clear()
    hub.resolve("org/bin")  # no safetensors: then the .bin files, and only the model's
    assert asked[1] == hub.BIN_FILES and "training_args.bin" not in asked[1]


def test_a_saved_mamba2_stops_at_the_end_of_text_in_transformers(tmp_path):
    """The HF export names the end-of-text token (0, as for Mamba-1): transformers' defaults (2 and 1) would never
    stop a generation."""
    from transformers import Mamba2ForCausalLM

    from tests.conftest import tiny_model_of

    directory = save_checkpoint(tiny_model_of("mamba2", n_layer=2), tmp_path / "m2", fmt="hf")
    theirs = Mamba2ForCausalLM.from_pretrained(str(directory))
    assert (theirs.config.eos_token_id, theirs.config.pad_token_id, theirs.config.bos_token_id) == (0, 0, 0)
    assert theirs.generation_config.eos_token_id == 0
