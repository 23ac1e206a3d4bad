"""On a GPU the greedy decode step (``_Decoder.device_step``: body forward, LM head on the needed rows, acceptance,
next block's argmax) has no host synchronisation, so it can be captured in a CUDA graph and replayed with new
drafts / offsets written into static buffers. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import tidar
from tidar.decode.args import check_generate_args
from tidar.decode.decoder import _Decoder
from tidar.decode.planner import Plan
from tidar.hf.cache import TidarCache


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_greedy_device_step_captures_in_a_cuda_graph(impl):
    backend = impl
    dev = torch.device("cuda")
    model = tidar.patch(tiny_model("qwen2").to(dev), draft_len=4, backend=backend)
    ids = torch.tensor([[5, 9, 13, 2, 7, 11]], device=dev)
    g = check_generate_args(model, ids, None, 16, 0.0, None, None, 1.0, None, None, None, None, None)
    dec = _Decoder(model, g, 4, None, backend, dict(temperature=0.0, backend=backend), None, False, False)
    cache = TidarCache(1, 128, backend=backend)
    drafts, _ = dec.prefill(cache, 4)
    plan = Plan(4, (1, 2, 3, 4))
    seg = cache.seq_lengths(dev)
    static_drafts, static_seg = drafts.clone(), seg.clone()
    eager = dec.device_step(cache, plan, static_drafts, static_seg)  # warm-up (validation runs here)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = dec.device_step(cache, plan, static_drafts, static_seg)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    # new inputs through the static buffers: the replay equals an eager step on them
    static_drafts.copy_(torch.roll(drafts, 1, 1))
    graph.replay()
    torch.cuda.synchronize()
    again = dec.device_step(cache, plan, static_drafts, static_seg)
    assert torch.equal(captured, again)
