"""Statistics over seeds: means and sample standard deviations, paired differences within seeds, the tables."""

from __future__ import annotations

import statistics

from hypothesis import given
from hypothesis import strategies as st

from fxsplit.experiment.statistics import differences, paired, paired_table, summarize, table

unit = st.floats(0, 1, allow_nan=False)


def arm(accuracy: tuple[float, float], conflicts: float, params: int) -> dict:
    return {"accuracy": dict(zip(("left", "right"), accuracy)), "mean_accuracy": sum(accuracy) / 2,
            "conflict_rate": {"0.0": conflicts, "-0.1": conflicts / 2}, "params": params, "increase": params / 100 - 1}


seed_runs = st.lists(st.fixed_dictionaries({name: st.builds(arm, st.tuples(unit, unit), unit, st.integers(100, 200))
                                            for name in ("joint", "recon")}), min_size=2, max_size=6).map(
    lambda arms: [{"seed": seed, "arms": a} for seed, a in enumerate(arms)])


@given(seed_runs)
def test_summary_is_mean_and_sample_sd_of_each_seed(runs):
    summary = summarize(runs)
    for name in ("joint", "recon"):
        values = [run["arms"][name]["conflict_rate"]["-0.1"] for run in runs]
        figure = summary[name]["conflicts cos<-0.1"]
        assert figure["values"] == values
        assert abs(figure["mean"] - statistics.fmean(values)) < 1e-12
        assert abs(figure["sd"] - statistics.stdev(values)) < 1e-9


@given(seed_runs)
def test_paired_differences_are_the_per_seed_differences(runs):
    diff = paired(runs, "recon", "joint")
    for metric, key in (("accuracy", "mean_accuracy"), ("params", "params")):
        expected = [run["arms"]["recon"][key] - run["arms"]["joint"][key] for run in runs]
        assert diff[metric]["values"] == expected
        assert abs(diff[metric]["mean"] - statistics.fmean(expected)) < 1e-12
    left = [run["arms"]["recon"]["accuracy"]["left"] - run["arms"]["joint"]["accuracy"]["left"] for run in runs]
    assert diff["accuracy left"]["values"] == left


def test_tables_show_mean_and_sd_and_each_seed():
    runs = [{"seed": 3, "arms": {"joint": arm((0.9, 0.8), 0.5, 100), "recon": arm((0.95, 0.85), 0.2, 150)}},
            {"seed": 4, "arms": {"joint": arm((0.7, 0.8), 0.3, 100), "recon": arm((0.8, 0.8), 0.1, 150)}}]
    assert table(runs).splitlines() == [
        "| arm | mean acc. | left acc. | right acc. | params | increase | conflicts % cos<0.0 | conflicts % cos<-0.1 |",
        "|---|---|---|---|---|---|---|---|",
        "| joint | 0.800 ± 0.071 | 0.800 ± 0.141 | 0.800 ± 0.000 | 100 | +0.0% | 40.0 ± 14.1 | 20.0 ± 7.1 |",
        "| recon | 0.850 ± 0.071 | 0.875 ± 0.106 | 0.825 ± 0.035 | 150 | +50.0% | 15.0 ± 7.1 | 7.5 ± 3.5 |",
    ]
    assert differences(runs, "recon", "joint").splitlines()[2:] == [
        "| 3 | +5.0 | -30.0 | -15.0 |",
        "| 4 | +5.0 | -20.0 | -10.0 |",
        "| mean ± sd | +5.0 ± 0.0 | -25.0 ± 7.1 | -12.5 ± 3.5 |",
    ]
    assert paired_table(runs, [("recon", "joint"), ("joint", "recon")]).splitlines() == [
        "| arm − baseline | Δ mean acc. | acc. higher in | Δ conflicts cos<0.0 | Δ conflicts cos<-0.1 |",
        "|---|---|---|---|---|",
        "| recon − joint | +5.0 ± 0.0 | 2/2 seeds | -25.0 ± 7.1 | -12.5 ± 3.5 |",
        "| joint − recon | -5.0 ± 0.0 | 0/2 seeds | +25.0 ± 7.1 | +12.5 ± 3.5 |",
    ]
