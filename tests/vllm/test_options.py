"""``tidar.vllm.speculative_config`` and the options' encoding in the proposer's class name (no vLLM needed)."""

from __future__ import annotations

import pytest

import tidar.vllm
from tidar.vllm.options import TidarOptions, is_tidar_path, parse_class_name


def test_speculative_config_is_what_vllm_takes():
    spec = tidar.vllm.speculative_config(num_speculative_tokens=6)
    assert spec == {
        "method": "custom_class",
        "model": "tidar.vllm.proposer.TidarProposer__levels_1__context_2",
        "num_speculative_tokens": 6,
    }
    assert is_tidar_path(spec["model"])
    paper = tidar.vllm.speculative_config(4, levels="all", context=0)
    assert paper["model"] == "tidar.vllm.proposer.TidarProposer"


@pytest.mark.parametrize(
    "opts",
    [TidarOptions(), TidarOptions((1, 3, 9), 3), TidarOptions(None, 4), TidarOptions((1,)), TidarOptions((1,), 2, 0)],
)
def test_class_name_round_trip(opts):
    assert parse_class_name(opts.class_name()) == opts


def test_proposer_module_makes_the_named_class():
    from tidar.vllm import proposer

    cls = proposer.TidarProposer__levels_1_2__context_3
    assert cls.options == TidarOptions((1, 2), 3) and issubclass(cls, proposer.TidarProposer)
    with pytest.raises(AttributeError):
        proposer.SomethingElse  # noqa: B018


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_speculative_tokens=0), "num_speculative_tokens must be an int >= 1"),
        (dict(num_speculative_tokens=4, levels=[1, 6]), r"levels must be .* in \[1, num_speculative_tokens \+ 1"),
        (dict(num_speculative_tokens=4, levels=[2, 3]), "levels must include 1"),
        (dict(num_speculative_tokens=4, levels=[3, 1]), "strictly increasing"),
        (dict(num_speculative_tokens=4, levels="some"), 'levels must be a list of ints or "all"'),
        (dict(num_speculative_tokens=4, context=-1), "context must be an int >= 0"),
        (dict(num_speculative_tokens=4, row_cost=-0.01), r"row_cost must be a number in \[0, 1\]"),
        (dict(num_speculative_tokens=4, row_cost=1.5), r"row_cost must be a number in \[0, 1\]"),
        (dict(num_speculative_tokens=4, row_cost="0.04"), r"row_cost must be a number in \[0, 1\]"),
        (dict(num_speculative_tokens=4, row_cost=0.0405), "row_cost must have at most 3 decimals"),
    ],
)
def test_bad_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tidar.vllm.speculative_config(**kwargs)


@pytest.mark.parametrize("name", ["TidarProposer__levels", "TidarProposer__speed_3", "Other__levels_1"])
def test_bad_class_names_refused(name):
    with pytest.raises(ValueError):
        parse_class_name(name)


def test_row_cost_travels_in_the_class_name():
    from tidar.vllm import proposer

    spec = tidar.vllm.speculative_config(8, row_cost=0.05)
    assert spec["model"] == "tidar.vllm.proposer.TidarProposer__levels_1__context_2__rowcost_50"
    cls = getattr(proposer, spec["model"].rsplit(".", 1)[1])
    assert cls.options.row_cost == 0.05
    assert tidar.vllm.speculative_config(8, row_cost=0)["model"].endswith("__rowcost_0")
    assert TidarOptions().row_cost is None  # the measured default (draft_source.ROW_COST)
