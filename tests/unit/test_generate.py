"""moelib.generate: eos handling, cache statistics, batch = alone, and the errors bad requests raise."""

import pytest
import torch
from test_kv_cache import tiny_model

import moelib
from moelib.errors import ConfigError, DataError
from moelib.inference.load import to_bf16


@torch.no_grad()
def test_each_prompt_continues_as_it_would_alone(one_thread):
    model = tiny_model()
    prompts = [[5, 9, 2, 7], [1], [3, 3, 8, 1, 0, 2, 6]]
    batch = moelib.generate(model, prompts, 6, temperature=0.0).tokens
    assert batch.shape == (3, 7 + 6)
    for b, p in enumerate(prompts):
        alone = moelib.generate(model, [p], 6).tokens[0]
        assert torch.equal(batch[b, 7 - len(p):], alone)
        assert torch.equal(batch[b, :7 - len(p)], torch.zeros(7 - len(p), dtype=torch.long))


@torch.no_grad()
def test_tokens_after_eos_repeat_it(one_thread):
    model = tiny_model()
    prompt = torch.tensor([[4, 8, 15, 16, 23]])
    free = moelib.generate(model, prompt, 8).tokens[0, 5:]
    eos = int(free[2])
    for speculative in (None, "mtp"):
        out = moelib.generate(model, prompt, 8, eos_token_id=eos, speculative=speculative).tokens[0, 5:]
        first = int((out == eos).nonzero()[0])
        assert torch.equal(out[:first + 1], free[:first + 1])
        assert (out[first:] == eos).all()


@pytest.mark.parametrize("to_dtype,size", [(lambda m: m, 4), (to_bf16, 2)], ids=["fp32", "bf16"])
@torch.no_grad()
def test_kv_bytes_per_token_is_layers_times_latent_width(to_dtype, size, one_thread):
    model = to_dtype(tiny_model())
    cfg = model.cfg
    stats = moelib.generate(model, [[1, 2, 3]], 2).stats
    assert stats["kv_bytes_per_token"] == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * size
    assert stats["main_forwards"] == 2 and stats["drafted"] == 0 and stats["tokens_per_s"] > 0
    assert model.inv_freq.dtype == torch.float32  # RoPE's frequencies are never rounded to bf16


@torch.no_grad()
def test_sampling_is_reproducible_from_its_seed(one_thread):
    model = tiny_model()
    runs = [moelib.generate(model, [[1, 2]], 10, temperature=1.0, seed=s).tokens for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


BAD = {
    "prompt too long": (dict(input_ids=[[1] * 60], max_new_tokens=5), DataError, "max_position_embeddings"),
    "empty prompt": (dict(input_ids=[[]]), DataError, "empty"),
    "id outside vocab": (dict(input_ids=[[1, 64]]), DataError, "vocabulary"),
    "negative temperature": (dict(temperature=-0.5), ConfigError, "--temperature"),
    "top_p zero": (dict(top_p=0.0), ConfigError, "--top-p"),
    "top_p above one": (dict(top_p=1.5), ConfigError, "--top-p"),
    "negative top_k": (dict(top_k=-1), ConfigError, "--top-k"),
    "zero new tokens": (dict(max_new_tokens=0), ConfigError, "--max-new-tokens"),
    "unknown attention": (dict(attention="flash"), ConfigError, "attention"),
    "unknown speculative": (dict(speculative="eagle"), ConfigError, "--speculative"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_requests_raise_one_sentence_naming_the_argument(name):
    kwargs, error, words = BAD[name]
    kwargs = {"input_ids": [[1, 2, 3]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=words):
        moelib.generate(tiny_model(), **kwargs)


def test_mtp_on_a_model_without_mtp_raises():
    with pytest.raises(ConfigError, match="num_nextn_predict_layers"):
        moelib.generate(tiny_model(num_nextn_predict_layers=0), [[1, 2]], 3, speculative="mtp")


def test_unknown_dtype_and_unreadable_path_raise(tmp_path):
    with pytest.raises(ConfigError, match="--dtype"):
        moelib.load_model(tmp_path, dtype="int4")
    with pytest.raises(moelib.MoelibError, match="nowhere"):
        moelib.load_model(tmp_path / "nowhere")
