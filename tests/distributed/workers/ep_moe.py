"""mpirun worker: an expert-parallel MoE equals the single-process MoE it was sharded from (fp32).

Every rank builds the same tiny model from one seed, keeps the full model as the reference and shards a
copy; each rank feeds its own tokens while the reference sees every rank's tokens. Each rank prints one
``EPRESULT {json}`` line of relative errors and counts per scenario; tests/distributed/test_expert_parallel.py
asserts on them (so a failure shows the numbers).
"""

from __future__ import annotations

import copy
import json

import torch
import torch.distributed as dist

from moelib.config import ModelConfig
from moelib.errors import ConfigError
from moelib.model.transformer import build_model
from moelib.parallel import launch
from moelib.parallel.expert_parallel import global_load_counts, shard_experts

SEQS, SEQ_LEN = 2, 6  # per rank
MOE = "1"             # the MoE layer of the 2-layer tiny model (layer 0 is dense)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference over the largest reference magnitude (0 for empty tensors)."""
    if b.numel() == 0:
        return 0.0
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def make_groups(world: int, ep: int):
    """(EP group, expert-data-parallel group) of this rank; EP groups are consecutive ranks. Every rank
    must create every group, in the same order."""
    ep_groups = [dist.new_group(list(range(s, s + ep))) for s in range(0, world, ep)]
    edp_groups = [dist.new_group(list(range(i, world, ep))) for i in range(ep)]
    rank = dist.get_rank()
    return ep_groups[rank // ep], edp_groups[rank % ep]


def tokens_per_rank(world: int, empty_rank: int | None) -> list[int]:
    return [0 if r == empty_rank else SEQS for r in range(world)]


def check_layer(model, world: int, rank: int, ep: int, *, train: bool = True, node: tuple[int, int] | None = None,
                starve_last: bool = False, empty_rank: int | None = None, seed: int = 1) -> dict:
    """Forward and backward of the MoE layer: outputs, input / gate-value / expert / router grads."""
    ep_group, edp_group = make_groups(world, ep)
    limit = dict(ranks_per_node=node[0], max_nodes=node[1]) if node else {}
    ep_model = shard_experts(copy.deepcopy(model), ep_group, **limit)
    ref_model = copy.deepcopy(model)
    ref, moe = ref_model.layers[MOE].mlp, ep_model.layers[MOE].mlp
    ref.gate.node_limit = moe.gate.node_limit
    local = moe.experts.num_experts
    if starve_last:  # no token may pick the last EP rank's experts: that rank receives nothing
        for m in (ref, moe):
            m.gate.e_score_correction_bias[-local:] = -1e3
    ref.train(train)
    moe.train(train)
    seqs = tokens_per_rank(world, empty_rank)
    moe.aux_loss_scale = SEQS / sum(seqs)  # the reference's aux loss averages over every rank's sequences
    gen = torch.Generator().manual_seed(seed)
    hidden = ref.gate.weight.shape[1]
    xs = [torch.randn(n, SEQ_LEN, hidden, generator=gen) for n in seqs]
    gs = [torch.randn(n, SEQ_LEN, hidden, generator=gen) for n in seqs]
    mine = slice(sum(seqs[:rank]), sum(seqs[: rank + 1]))

    x_ref = torch.cat(xs).requires_grad_()
    out_ref = ref(x_ref)
    (out_ref * torch.cat(gs)).sum().backward()
    x = xs[rank].clone().requires_grad_()
    out = moe(x)
    (out * gs[rank]).sum().backward()

    res = {"out": rel(out, out_ref[mine]), "x_grad": rel(x.grad, x_ref.grad[mine])}
    lo = moe.experts.expert_offset
    for name in ("gate_up_proj", "down_proj"):  # each expert's grad: its EP group's tokens, summed over replicas
        grad = getattr(moe.experts, name).grad.clone()
        dist.all_reduce(grad, group=edp_group)
        res[f"{name}_grad"] = rel(grad, getattr(ref.experts, name).grad[lo: lo + local])
    for name, p in moe.named_parameters():  # replicated parameters: summed over every rank
        if not name.startswith("experts."):
            grad = p.grad.clone()
            dist.all_reduce(grad)
            res[f"{name}_grad"] = rel(grad, dict(ref.named_parameters())[name].grad)
    if train:
        res["load_counts"] = rel(global_load_counts(moe), ref.load_counts)
    res.update(routing_facts(moe, x, local, node))
    res["expert_rows"] = int(moe.load_counts.sum()) if train else None
    return res


def routing_facts(moe, x: torch.Tensor, local: int, node: tuple[int, int] | None) -> dict:
    """How many (token, rank) rows dispatch sent against the (token, expert) pairs, and the most nodes
    any token reached."""
    with torch.no_grad():
        indices, _, _ = moe.gate(x.reshape(-1, x.shape[-1]))
    ranks = indices // local
    pairs_token_rank = sum(len(set(r.tolist())) for r in ranks)
    per_node = node[0] if node else moe.dispatcher.size
    nodes = max((len(set((r // per_node).tolist())) for r in ranks), default=0)
    d = moe.dispatcher
    hidden, k = x.shape[-1], indices.shape[1]
    row_bytes = hidden * x.element_size() + k * 4 + k * d.ids_dtype.itemsize
    return {"rows_sent": d.bytes_sent["dispatch"] // row_bytes, "token_rank_pairs": pairs_token_rank,
            "rows_received": d.bytes_sent["combine"] // (hidden * x.element_size()),
            "token_expert_pairs": indices.numel(), "max_nodes_reached": nodes}


def check_model(model, world: int, rank: int) -> dict:
    """shard_experts on a whole model: logits of this rank's tokens and global state-dict keys."""
    model = copy.deepcopy(model).eval()  # eval: leave the shared model's load counts alone
    ep_model = shard_experts(copy.deepcopy(model), dist.group.WORLD)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, model.cfg.vocab_size, (world, SEQS, SEQ_LEN), generator=gen)
    with torch.no_grad():
        ref_logits = model(tokens.flatten(0, 1)).view(world, SEQS, SEQ_LEN, -1)
        logits = ep_model(tokens[rank])
    full, sharded = model.state_dict(), ep_model.state_dict()
    local = model.cfg.n_routed_experts // world
    want_experts = {f"layers.{MOE}.mlp.experts.{e}." for e in range(rank * local, (rank + 1) * local)}
    expert_keys = {k.rsplit(".", 2)[0] + "." for k in sharded if ".mlp.experts." in k}
    return {"logits": rel(logits, ref_logits[rank]),
            "keys_subset": set(sharded) <= set(full),
            "values_equal": all(torch.equal(v, full[k]) for k, v in sharded.items()),
            "expert_keys_local": expert_keys == want_experts}


def check_bad_ep() -> str:
    """EP size not dividing the expert count: ConfigError naming the rule."""
    cfg = ModelConfig.from_preset("tiny", num_hidden_layers=2, num_nextn_predict_layers=0, n_routed_experts=5,
                                  n_group=1, topk_group=1)
    try:
        shard_experts(build_model(cfg, "fp32", seed=0), dist.group.WORLD)
    except ConfigError as e:
        return str(e)
    return "no error"


def main() -> None:
    env = launch.init()
    world, rank = env.world_size, env.rank
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", num_hidden_layers=2, num_nextn_predict_layers=0)
    model = build_model(cfg, "fp32", seed=0)
    with torch.no_grad():  # a random selection bias, so routing is not just the (tiny) gate logits
        model.layers[MOE].mlp.gate.e_score_correction_bias.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    results = {
        f"ep{world}": check_layer(model, world, rank, world),
        "ep1": check_layer(model, world, rank, 1),
        f"ep{world}_empty_starved": check_layer(model, world, rank, world, train=False, starve_last=True,
                                                empty_rank=0),
        "model": check_model(model, world, rank),
        "bad_ep": check_bad_ep(),
    }
    if world >= 4:
        results["ep2_edp"] = check_layer(model, world, rank, 2)
        results[f"ep{world}_node_limited"] = check_layer(model, world, rank, world, node=(2, 1))
        results[f"ep{world}_two_nodes_unlimited"] = check_layer(model, world, rank, world, node=(2, 2))
    print("EPRESULT " + json.dumps({"rank": rank, "world": world, **results}), flush=True)
    launch.shutdown()


if __name__ == "__main__":
    main()
