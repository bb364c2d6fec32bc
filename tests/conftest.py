import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU in the interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

from simba_cli.models.config import MambaConfig  # noqa: E402
from simba_cli.models.mamba import MambaLM  # noqa: E402


def tiny_config(**kw) -> MambaConfig:
    base = dict(d_model=32, n_layer=3, vocab_size=64, d_state=8, expand=2, d_conv=4)
    base.update(kw)
    return MambaConfig(**base)


def random_model(cfg: MambaConfig | None = None, seed: int = 0) -> MambaLM:
    """A model whose every parameter is random (not just the structured Mamba init)."""
    cfg = cfg or tiny_config()
    torch.manual_seed(seed)
    model = MambaLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith(".D"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "bias" in name and "dt_proj" not in name:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


NO_ONEDNN = "oneDNN's path is for x86-64 builds of torch with it"


def count_onednn_calls(monkeypatch) -> list:
    """The weights' shapes of the projections that take oneDNN's path (`ops.linear`), one per call."""
    from simba_cli.ops import linear as ops_linear

    calls = []
    real = ops_linear.onednn_linear

    def spy(x, weight, bias=None):
        calls.append(weight.shape)
        return real(x, weight, bias)

    monkeypatch.setattr(ops_linear, "onednn_linear", spy)
    return calls


@pytest.fixture(params=["F.linear", "oneDNN"])
def projections(request, monkeypatch):
    """Runs a test twice: every projection of the models (`ops.linear`) through F.linear, then every one through
    oneDNN, the path large weights take in CPU inference, which a tiny model's weights would never reach. The
    second run fails if no projection took it."""
    from simba_cli.ops import linear as ops_linear

    onednn = request.param == "oneDNN"
    if onednn and not ops_linear.onednn_available():
        pytest.skip(NO_ONEDNN)
    monkeypatch.setattr(ops_linear, "ONEDNN_MIN_WEIGHT", 0 if onednn else 1 << 62)
    calls = count_onednn_calls(monkeypatch)
    yield request.param
    assert bool(calls) == onednn


@pytest.fixture
def tiny_model():
    return random_model()


def tiny_mamba2_config(**kw):
    """A tiny Mamba-2: D = 64 channels in H = 8 heads of P = 8, G = 2 groups, N = 8, chunks of 8 tokens."""
    from simba_cli.models.mamba2 import Mamba2Config

    base = dict(d_model=32, n_layer=3, vocab_size=64, d_state=8, expand=2, head_dim=8, n_groups=2, chunk_size=8)
    base.update(kw)
    return Mamba2Config(**base)


def random_mamba2(cfg=None, seed: int = 0):
    """A Mamba2LM whose every parameter is random: decays, step biases, skips and norms too."""
    from simba_cli.models.mamba2 import Mamba2LM

    cfg = cfg or tiny_mamba2_config()
    torch.manual_seed(seed)
    model = Mamba2LM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(0.5 * torch.randn_like(p))
            elif name.endswith("dt_bias"):
                p.copy_(0.5 * torch.randn_like(p) - 1)
            elif name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "bias" in name:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_model_of(family: str, seed: int = 0, **kw):
    """A random tiny LM of either family ("mamba" or "mamba2"), vocabulary 64."""
    return random_model(tiny_config(**kw), seed) if family == "mamba" else random_mamba2(tiny_mamba2_config(**kw), seed)
