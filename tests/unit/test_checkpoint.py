import json
import os
import shutil

import pytest
import torch

import moelib.train.checkpoint as ckpt
from moelib import CheckpointError, ModelConfig
from moelib.model import build_model

CFG = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16,
           n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=8,
           qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_attention_heads=2)


@pytest.fixture
def model():
    cfg = ModelConfig.from_preset("tiny", **CFG)
    m = build_model(cfg, "fp32", seed=0)
    for moe in m.moe_layers().values():
        moe.gate.e_score_correction_bias.normal_()
    return cfg, m


def test_round_trip_and_latest(tmp_path, model):
    cfg, m = model
    ckpt.save_checkpoint(tmp_path, m.state_dict(), cfg, 5, extra={"data": {"consumed_samples": 40}})
    second = ckpt.save_checkpoint(tmp_path, m.state_dict(), cfg, 10)
    assert (tmp_path / "latest").read_text().strip() == second.name == "iter_0000010"
    manifest, state = ckpt.load_checkpoint(tmp_path)
    assert manifest["step"] == 10 and ModelConfig.from_dict(manifest["model"]) == cfg
    assert state.keys() == m.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    assert ckpt.load_checkpoint(tmp_path / "iter_0000005")[0]["data"] == {"consumed_samples": 40}
    assert not list(tmp_path.glob(".*tmp*"))


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, model, monkeypatch):
    cfg, m = model
    ckpt.save_checkpoint(tmp_path, m.state_dict(), cfg, 1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, m.state_dict(), cfg, 2)
    assert not (tmp_path / "iter_0000002").exists()
    assert ckpt.load_checkpoint(tmp_path)[0]["step"] == 1
    monkeypatch.undo()
    assert ckpt.save_checkpoint(tmp_path, m.state_dict(), cfg, 2).name == "iter_0000002"  # leftovers cleaned


def test_bad_checkpoints_name_the_file(tmp_path, model):
    cfg, m = model
    with pytest.raises(CheckpointError, match="no manifest.json"):
        ckpt.load_checkpoint(tmp_path)
    path = ckpt.save_checkpoint(tmp_path, m.state_dict(), cfg, 3)
    shard = next(path.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=shard.name):
        ckpt.load_checkpoint(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format"] = "something-else"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format"):
        ckpt.load_checkpoint(path)


def test_keep_last_k_and_lazy_reader(tmp_path, model):
    cfg, m = model
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, m.state_dict(), cfg, step)
        ckpt.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000003", "iter_0000004"]
    reader = ckpt.CheckpointReader(tmp_path)
    assert reader.path.name == "iter_0000004" and set(reader.keys()) == set(m.state_dict())
    name = "layers.1.mlp.experts.3.down_proj.weight"
    assert torch.equal(reader.get(name), m.state_dict()[name])
    with pytest.raises(CheckpointError, match="not in the checkpoint"):
        reader.get("no.such.tensor")


def test_stale_leftovers_of_killed_saves_are_removed(tmp_path, model):
    cfg, m = model
    ckpt.save_checkpoint(tmp_path, m.state_dict(), cfg, 1)
    ckpt.save_checkpoint(tmp_path, m.state_dict(), cfg, 2)
    (tmp_path / ".iter_0000003.tmp").mkdir()  # killed while writing step 3
    (tmp_path / ".iter_0000003.tmp" / "model-00000-of-00001.safetensors").write_bytes(b"partial")
    (tmp_path / ".iter_0000002.old").mkdir()  # killed after a re-save of step 2 moved in
    os.rename(tmp_path / "iter_0000001", tmp_path / ".iter_0000001.old")  # killed between a re-save's renames
    ckpt.save_checkpoint(tmp_path, m.state_dict(), cfg, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "iter_0000002", "iter_0000004", "latest"]
    assert ckpt.load_checkpoint(tmp_path / "iter_0000001")[0]["step"] == 1


def test_resaving_a_step_never_leaves_latest_naming_nothing(tmp_path, model, monkeypatch):
    """Every file-system change of the re-save (each rename, the final delete) is bracketed by a load of the
    root: it always finds a complete checkpoint of that step."""
    cfg, m = model
    ckpt.save_checkpoint(tmp_path, m.state_dict(), cfg, 5, extra={"copy": "first"})
    copies = []

    def loads():
        manifest, state = ckpt.load_checkpoint(tmp_path)
        assert manifest["step"] == 5 and state.keys() == m.state_dict().keys()
        copies.append(manifest["copy"])

    def bracketed(real):
        def call(*args, **kwargs):
            loads()
            out = real(*args, **kwargs)
            loads()
            return out
        return call

    for module, name in ((os, "rename"), (os, "replace"), (shutil, "rmtree")):
        monkeypatch.setattr(module, name, bracketed(getattr(module, name)))
    ckpt.save_checkpoint(tmp_path, m.state_dict(), cfg, 5, extra={"copy": "second"})
    monkeypatch.undo()
    assert copies[0] == "first" and copies[-1] == "second" and len(copies) >= 6
    assert ckpt.load_checkpoint(tmp_path)[0]["copy"] == "second" and not list(tmp_path.glob(".iter*"))
