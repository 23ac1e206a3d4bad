"""The paged Triton kernels (``tidar_attention_paged``'s forward with and without split-KV and the separate-segment
form, ``kv_append_paged``) compile for an H100 (sm_90a) in the configurations they launch with: the check of
``test_triton_compile_sm90.py`` (its compile script, machinery unchanged) driving the paged launchers instead.

Opt-in, like that check:
``TIDAR_TRITON_COMPILE_CHECK=1 python -m pytest tests/kernels/test_triton_compile_sm90_paged.py``
(``TIDAR_COMPILE_DIMS`` / ``TIDAR_COMPILE_DTYPES`` narrow it; default head dims 64 and 128, fp16 and bf16).
"""

from __future__ import annotations

import os

import pytest
import test_triton_compile_sm90 as base

_LAUNCHES = r"""
import tidar_kernels.triton.tidar_attention_paged as PA
import tidar_kernels.triton.kv_append_paged as KVP
from tidar_kernels import layouts

PA._config = A._config
for n in ("_paged_fwd_kernel", "_merge_kernel"):
    setattr(PA, n, Rec(getattr(PA, n), n))
KVP._kv_append_paged_kernel = Rec(KVP._kv_append_paged_kernel, "_kv_append_paged_kernel")
DIMS = [int(x) for x in os.environ.get("TIDAR_COMPILE_DIMS", "64,128").split(",")]
lay = layouts.decode_step(16)  # S = 272
for D in DIMS:
    for dn in DTYPES:
        dt = DT[dn]
        for page in (16, 32):
            B, Hq, Hkv, S, P = 1, 12, 2, lay.seg_len, 4096
            nb = (P + S) // page + 2
            q = torch.zeros(B, Hq, S, D, dtype=dt)
            kc = torch.zeros(nb, page, Hkv, D, dtype=dt)
            table = torch.arange(nb - 1, dtype=torch.int32)[None]
            seq = torch.tensor([P + S], dtype=torch.int32)
            ll, bid = lay.local_limit, lay.block_id
            TAG.update(D=D, config=f"D={D} {dn} paged step block={page} S=272 Skv={P + S} no split")
            PA._forward(q, kc, kc, table, seq, ll, bid, 0.1, 0.0, 1)
            TAG.update(config=f"D={D} {dn} paged step block={page} split=8 softcap")
            PA._forward(q, kc, kc, table, seq, ll, bid, 0.1, 30.0, 8)
            ks = torch.zeros(B, Hkv, S - 16, D, dtype=dt)
            TAG.update(config=f"D={D} {dn} paged step block={page} proposal rows off the pool (k_seg)")
            PA._forward(q, kc, kc, table, seq - (S - 16), ll, bid, 0.1, 0.0, 1, ks, ks)
for D in DIMS:
    for T in (17, 64 * 272):
        kc = torch.zeros(2048, 16, 8, D, dtype=torch.bfloat16)
        kn = torch.zeros(T, 8, D, dtype=torch.bfloat16)
        TAG.update(D=D, config=f"D={D} 16-bit T={T} block=16")
        KVP.kv_append_paged(kc, kc, kn, kn, torch.zeros(T, dtype=torch.int64))
"""


def _script() -> str:
    """The base compile script with its launches replaced by the paged ones (machinery and checks unchanged)."""
    s = base._COMPILE_SCRIPT
    start = s.index("\nfor D in DIMS:")
    end = s.index("\ndef specialize(")
    return s[:start] + "\n" + _LAUNCHES + "\n" + s[end:]


@pytest.mark.skipif(
    os.environ.get("TIDAR_TRITON_COMPILE_CHECK") != "1", reason="opt-in: TIDAR_TRITON_COMPILE_CHECK=1 (minutes)"
)
def test_paged_kernels_compile_for_sm90(monkeypatch):
    monkeypatch.setattr(base, "_COMPILE_SCRIPT", _script())
    r, rows = base._run()
    assert rows, r.stdout[-3000:] + r.stderr[-3000:]
    bad = [row for row in rows if not row["ok"] or not row["smem_ok"]]
    assert not bad, bad
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"_paged_fwd_kernel", "_merge_kernel", "_kv_append_paged_kernel"}, kernels
    spills = [(row["kernel"], row["D"], row["config"]) for row in rows if not row["no_spills"]]
    assert not spills, spills
    for row in rows:
        if row["kernel"] == "_paged_fwd_kernel":
            assert row["mma"] in ("mma.sync", "wgmma"), row  # the dots run on tensor cores
