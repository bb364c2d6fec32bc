"""Decoding: argument checks, and a Simba-pruned prefill against the dense computation it stands for."""

import pytest
import torch

from simba_cli.errors import UserError
from simba_cli.models.decode import generate
from tests.conftest import random_model, tiny_config


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
    assert generate(model, ids, 3, top_p=1e-6, temperature=0.7, generator=gen).shape == (1, 3)
