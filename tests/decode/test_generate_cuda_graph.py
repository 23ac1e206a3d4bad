"""On a GPU the greedy decode step (``Decoder.device_step``: body forward, LM head on the needed rows, acceptance,
next block's argmax) has no host synchronisation, so it can be captured in a CUDA graph and replayed with new
drafts / offsets written into static buffers. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import tidar


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_greedy_device_step_captures_in_a_cuda_graph(impl):
    backend = impl
    dev = torch.device("cuda")
    model = tidar.patch(tiny_model("qwen2").to(dev), draft_len=4, backend=backend)
    ids = torch.tensor([[5, 9, 13, 2, 7, 11]], device=dev)
    dec = tidar.Decoder(model, ids, max_new_tokens=16, draft_len=4, backend=backend, context_drafts=False)
    assert dec.prefill().draft_len == 4
    planned = dec.plan()
    plan = planned.plan
    assert plan.draft_len == 4 and plan.levels == (1, 2, 3, 4)
    seg = dec.cache.seq_lengths(dev)
    static_drafts, static_seg = planned.tokens.clone(), seg.clone()
    eager = dec.device_step(plan, static_drafts, static_seg)  # warm-up (validation runs here)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = dec.device_step(plan, static_drafts, static_seg)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    # new inputs through the static buffers: the replay equals an eager step on them
    static_drafts.copy_(torch.roll(planned.tokens, 1, 1))
    graph.replay()
    torch.cuda.synchronize()
    again = dec.device_step(plan, static_drafts, static_seg)
    assert torch.equal(captured, again)
