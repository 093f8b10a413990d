"""Greedy generation from an fp32 HF export: moelib.generate against transformers' generate."""

import pytest
import torch

import moelib
from moelib import ModelConfig, YarnConfig
from moelib.model import build_model

transformers = pytest.importorskip("transformers", reason="transformers is needed for the parity tests")
from _weights import randomize  # noqa: E402
from test_hf_parity import BASE, write_hf_dir  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

NEW = 32


@pytest.fixture
def one_thread():
    """Decoding is many small GEMMs, which run several times slower on threads that share busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def test_greedy_matches_transformers_generate(tmp_path, one_thread):
    # Weights at std 0.3 give logits spread well beyond fp32 rounding: the margin check below proves no
    # step of the comparison is a near-tie decided by summation order.
    yarn = YarnConfig(factor=4.0, original_max_position_embeddings=32)
    cfg = ModelConfig.from_preset("tiny", **{**BASE, "num_hidden_layers": 2, "init_std": 0.3, "rope_scaling": yarn})
    model = build_model(cfg, "fp32", seed=0).eval()
    randomize(model, seed=1)
    write_hf_dir(model, cfg, tmp_path)
    ours_model = moelib.load_model(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen) for n in (7, 19, 3)]
    for attention in ("absorb", "naive"):
        ours = moelib.generate(ours_model, prompts, NEW, attention=attention).tokens[:, -NEW:]
        for b, prompt in enumerate(prompts):
            theirs = hf.generate(prompt[None], max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0)[0, prompt.numel():]
            assert torch.equal(ours[b], theirs), (attention, b)
    for b, prompt in enumerate(prompts):
        top2 = model(torch.cat([prompt, ours[b]])[None])[0, prompt.numel() - 1:-1].topk(2).values
        assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-3
