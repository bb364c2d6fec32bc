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


@pytest.fixture
def tiny_model():
    return random_model()
