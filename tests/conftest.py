import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests import shared builders from each other

# Tests never touch the network: Hugging Face loaders must use local files only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLI's feature cache defaults to ~/.cache/iterwego; tests keep theirs in a throwaway directory.
import tempfile  # noqa: E402

os.environ["ITERWEGO_CACHE"] = tempfile.mkdtemp(prefix="iterwego-test-cache-")


# --------------------------------------------------------------------------- model fixtures (appended)
import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def no_network(monkeypatch):
    """Fail any socket connection; yields the list of attempted addresses (must stay empty)."""
    attempts: list = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError(f"network disabled in tests (tried {address!r})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield attempts


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIPModel saved with save_pretrained (vision 32px, patch 8, width 32; projection 16)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    d = tmp_path_factory.mktemp("tiny-clip")
    text = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny random BertModel (width 32, 2 layers) saved next to the MiniLM tokenizer (same vocabulary)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from iterwego.encoders import minilm_dir

    d = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(d)
    return d


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (the machines have 2 shared cores; more threads only contend)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
