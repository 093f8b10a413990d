"""mpirun worker: FP8 dispatch (bytes on the wire, accuracy) and the asynchronous dispatch / combine.

Each rank routes its own tokens through the sharded experts of one tiny MoE layer with several
dispatchers and prints one ``EPRESULT {json}`` line; tests/distributed/test_expert_parallel.py asserts on it.
"""

from __future__ import annotations

import copy
import json
import time

import torch
import torch.distributed as dist

from moelib.config import ModelConfig
from moelib.model.transformer import build_model
from moelib.parallel import launch
from moelib.parallel.expert_parallel import AllToAllDispatcher, shard_experts
from moelib.precision.fp8 import dequantize, quantize

TOKENS = 24     # per rank
DELAY_S = 1.0   # how long the last rank holds back its payload all-to-all in the in-flight check


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) if b.numel() else 0.0


def run(d: AllToAllDispatcher, experts, x, indices, weights, grad=None, between=None):
    """Dispatch, experts, combine (the async API, with ``between`` called while each all-to-all is in
    flight); with ``grad`` also backward. Returns (out, rows, x.grad, weights.grad)."""
    x = x.detach().clone().requires_grad_()
    weights = weights.detach().clone().requires_grad_()
    h = d.dispatch_start(x, indices, weights, d.num_experts)
    if between:
        between()
    rows, counts, state = h.wait()
    c = d.combine_start(experts(rows, counts, state.row_weights), state)
    if between:
        between()
    out = c.wait()
    if grad is not None:
        (out * grad).sum().backward()
    return out, rows, x.grad, weights.grad


def fp8_checks(experts, x, indices, weights, grad) -> dict:
    world = dist.group.WORLD
    num_experts = experts.num_experts * dist.get_world_size()
    exact = AllToAllDispatcher(world, num_experts)
    bf16 = AllToAllDispatcher(world, num_experts)
    fp8 = AllToAllDispatcher(world, num_experts, fp8=True)
    out, rows, gx, gw = run(exact, experts, x, indices, weights, grad)
    run(bf16, experts, x.bfloat16(), indices, weights)
    out8, rows8, gx8, gw8 = run(fp8, experts, x, indices, weights, grad)
    # E4M3 with a power-of-2 scale s per 1×128 tile: relative error <= 2^-4 for normal values, absolute
    # error <= s * 2^-10 for subnormals, and s < 2 * amax / 448.
    tile_amax = rows.detach().view(rows.shape[0], -1, 128).abs().amax(-1, keepdim=True).expand(-1, -1, 128)
    bound = 2**-4 * rows.detach().abs() + (tile_amax * 2 / 448 * 2**-10).reshape(rows.shape)
    # The same layer fed the dequantised tokens differs from the FP8 one only by the bf16 combine.
    xq = dequantize(*quantize(x, (1, 128), pow2_scale=True))
    out_q = run(exact, experts, xq, indices, weights)[0]
    b = {k: torch.tensor([fp8.bytes_sent[k], bf16.bytes_sent[k], exact.bytes_sent[k]], dtype=torch.float64)
         for k in ("dispatch", "combine", "dispatch_grad")}
    for t in b.values():
        dist.all_reduce(t)
    return {
        "rows_err_over_bound": float(((rows8 - rows).detach().abs() / bound.clamp(min=1e-30)).max()),
        "rows_changed": bool((rows8 != rows).any()),
        "out_vs_exact": rel(out8, out),
        "out_vs_dequantised_input": rel(out8, out_q),
        "x_grad_vs_exact": rel(gx8, gx),
        "w_grad_vs_exact": rel(gw8, gw),
        "bytes_dispatch_fp8": int(b["dispatch"][0]), "bytes_dispatch_bf16": int(b["dispatch"][1]),
        "bytes_dispatch_fp32": int(b["dispatch"][2]),
        "bytes_combine_fp8": int(b["combine"][0]), "bytes_combine_bf16": int(b["combine"][1]),
        "bytes_dispatch_grad_fp8": int(b["dispatch_grad"][0]), "bytes_dispatch_grad_fp32": int(b["dispatch_grad"][2]),
        "rank_ratio": fp8.bytes_sent["dispatch"] / max(1, bf16.bytes_sent["dispatch"]),
    }


def busy(seconds: float) -> None:
    """Compute (matmuls) for about ``seconds``."""
    a = torch.randn(256, 256)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)


def async_checks(experts, x, indices, weights, grad) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    num_experts = experts.num_experts * world
    d = AllToAllDispatcher(dist.group.WORLD, num_experts)
    experts.zero_grad()
    x_s = x.detach().clone().requires_grad_()
    w_s = weights.detach().clone().requires_grad_()
    rows_s, counts_s, st = d.dispatch(x_s, indices, w_s, num_experts)
    out_s = d.combine(experts(rows_s, counts_s, st.row_weights), st)
    (out_s * grad).sum().backward()
    expert_grads_s = [p.grad.clone() for p in experts.parameters()]
    experts.zero_grad()
    out_a, rows_a, gx_a, gw_a = run(d, experts, x, indices, weights, grad, between=lambda: busy(0.05))
    equal = (torch.equal(out_a, out_s) and torch.equal(rows_a, rows_s) and torch.equal(gx_a, x_s.grad)
             and torch.equal(gw_a, w_s.grad)
             and all(torch.equal(p.grad, g) for p, g in zip(experts.parameters(), expert_grads_s)))

    # In flight: the last rank posts its payload all-to-alls DELAY_S late, so on the other ranks the
    # work cannot have finished when dispatch_start / combine_start return; wait() is what completes it.
    if rank == world - 1:
        post = dist.all_to_all_single

        def late(*args, **kwargs):
            if kwargs.get("async_op"):
                time.sleep(DELAY_S)
            return post(*args, **kwargs)

        dist.all_to_all_single = late
    with torch.no_grad():
        t0 = time.perf_counter()
        h = d.dispatch_start(x, indices, weights, num_experts)
        dispatch_pending = not h.is_completed()
        busy(0.3)
        rows, counts, state = h.wait()
        dispatch_done = h.is_completed()
        t_dispatch = time.perf_counter() - t0
        c = d.combine_start(experts(rows, counts, state.row_weights), state)
        combine_pending = not c.is_completed()
        c.wait()
        combine_done = c.is_completed()
    if rank == world - 1:
        dist.all_to_all_single = post
    return {"async_equals_sync": equal, "dispatch_pending_after_start": dispatch_pending,
            "dispatch_done_after_wait": dispatch_done, "combine_pending_after_start": combine_pending,
            "combine_done_after_wait": combine_done,
            # 0.3 s of compute ran while the peer's 1 s delay elapsed: ~1.0 s overlapped, ~1.3 s not.
            "dispatch_wall_s_with_0.3s_compute_vs_1s_delay": round(t_dispatch, 3)}


def fp8_backend_check(cfg, rank: int, world: int) -> dict:
    """FP8 dispatch under the FP8 backend: the experts' first GEMM quantises its input with the same
    1×128 power-of-2 scales, so quantising at dispatch loses nothing more; only the bf16 combine sums
    differ from the full model."""
    ref = build_model(cfg, "fp8-emulated", seed=0)
    ep = shard_experts(copy.deepcopy(ref), dist.group.WORLD, fp8=True)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(world, 2, 8, cfg.hidden_size, generator=gen)
    with torch.no_grad(), ref.backend.autocast():
        out_ref = ref.layers["1"].mlp.eval()(x.flatten(0, 1)).view(world, 2, 8, -1)[rank]
        out = ep.layers["1"].mlp.eval()(x[rank])
    return {"out_vs_full_model": rel(out, out_ref)}


def main() -> None:
    env = launch.init()
    world, rank = env.world_size, env.rank
    cfg = ModelConfig.from_preset("tiny", num_hidden_layers=2, num_nextn_predict_layers=0)
    model = build_model(cfg, "fp32", seed=0)
    ref = model.layers["1"].mlp
    with torch.no_grad():
        ref.gate.e_score_correction_bias.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
        for p in ref.experts.parameters():  # O(1) expert outputs, so the FP8 error is not lost in rounding
            p.mul_(30)
    experts = shard_experts(copy.deepcopy(model), dist.group.WORLD).layers["1"].mlp.experts
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(TOKENS, cfg.hidden_size, generator=gen)
    x[0] *= 1e-3  # a token far below its neighbours' scale: its own 1×128 scales keep it accurate
    grad = torch.randn(TOKENS, cfg.hidden_size, generator=gen)
    with torch.no_grad():
        indices, weights, _ = ref.gate(x)
    results = {"fp8": fp8_checks(experts, x, indices, weights, grad),
               "async": async_checks(experts, x, indices, weights, grad),
               "fp8_backend": fp8_backend_check(cfg, rank, world)}
    print("EPRESULT " + json.dumps({"rank": rank, "world": world, **results}), flush=True)
    launch.shutdown()


if __name__ == "__main__":
    main()
