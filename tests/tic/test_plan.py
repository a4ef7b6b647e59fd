"""curate tic plan: each strategy on a worked example with hand-derived years, weights and samples.

Worked example (sizes chosen so every share is an integer):
    years   2014 2015 2016 | 2017 | 2018 | 2019
    sizes    100  100  200 |  400 |  400 |  600
    steps   "2016" = 2014..2016 (D1 = 400), "2017" (D2 = 400), "2018" (D3 = 400), "2019" (D4 = 600)
    budget C = 1000 samples per step; buffer B = size of the new step's data (default).

Cumulative-Exp, buffer B split 1/2 to the previous step, 1/4 to the one before, ..., the two
oldest steps sharing equally (paper: "at step 4 keep D/4, D/4, D/2 of steps 1, 2, 3"):
    step 2 (B=400): D1 400 (all of it)
    step 3 (B=400): D1 200, D2 200
    step 4 (B=600): D1 150, D2 150, D3 300   -> mixture 150+150+300+600 = 1200
Cumulative-Equal, B split equally over the previous steps:
    step 3 (B=400): D1 200, D2 200;   step 4 (B=600): 200, 200, 200 -> mixture 1200
Cumulative-All step 4: 100,100,200,400,400,600 = 1800 samples, probabilities size/1800.
Oracle: one run from scratch on 2014..2019 for 4 x 1000 samples.
"""

import json
from fractions import Fraction

import pytest
from click.testing import CliRunner

from curate.cli.main import main
from curate.errors import CurateError
from curate.tic import TicError
from curate.tic.plan import buffer_shares, make_plan, parse_steps, read_plan, step_years, write_plan

SIZES = {"2014": 100, "2015": 100, "2016": 200, "2017": 400, "2018": 400, "2019": 600}
STEPS = [2016, 2017, 2018, 2019]


def plan(strategy, **kw):
    return make_plan(strategy, STEPS, 1000, SIZES, warmup=500, warm_start_warmup=0, **kw)


def mix(step):
    """[(years, role, samples, probability)] of a step."""
    return [(tuple(d["years"]), d["role"], d["samples"], d["probability"]) for d in step["data"]]


def test_first_step_is_2014_to_2016():
    assert step_years(STEPS) == [[2014, 2015, 2016], [2017], [2018], [2019]]
    assert parse_steps("2016, 2017,2018") == [2016, 2017, 2018]


@pytest.mark.parametrize("t, exp, equal", [
    (2, ["1"], ["1"]),
    (3, ["1/2", "1/2"], ["1/2", "1/2"]),
    (4, ["1/4", "1/4", "1/2"], ["1/3", "1/3", "1/3"]),
    (5, ["1/8", "1/8", "1/4", "1/2"], ["1/4"] * 4),
])
def test_buffer_shares(t, exp, equal):
    assert buffer_shares("cumulative-exp", t) == [Fraction(s) for s in exp]
    assert buffer_shares("cumulative-equal", t) == [Fraction(s) for s in equal]


def test_sequential():
    p = plan("sequential")
    s = p["steps"]
    assert [x["name"] for x in s] == ["2016", "2017", "2018", "2019"]
    assert mix(s[0]) == [((2014,), "new", 100, 0.25), ((2015,), "new", 100, 0.25), ((2016,), "new", 200, 0.5)]
    assert mix(s[3]) == [((2019,), "new", 600, 1.0)]
    assert (s[0]["init"], s[0]["train"]["warmup"], s[0]["train"]["new_run"], s[0]["train"]["resume"]) == \
        ("scratch", 500, False, "latest")
    assert (s[2]["init"], s[2]["warm_start_from"], s[2]["train"]["warmup"], s[2]["train"]["new_run"]) == \
        ("warm", "2017", 0, True)
    assert s[2]["train"]["resume"] == "runs/tic/sequential/2017/checkpoints/epoch_latest.pt"
    assert all(x["train"]["train_num_samples"] == 1000 for x in s)
    assert s[3]["train"]["data"] == "tic/train/2019" and s[3]["train"]["exp_name"] == "2019"


def test_cumulative_all():
    s = plan("cumulative-all")["steps"]
    assert mix(s[3]) == [((2014,), "old", 100, round(100 / 1800, 12)), ((2015,), "old", 100, round(100 / 1800, 12)),
                         ((2016,), "old", 200, round(200 / 1800, 12)), ((2017,), "old", 400, round(400 / 1800, 12)),
                         ((2018,), "old", 400, round(400 / 1800, 12)), ((2019,), "new", 600, round(600 / 1800, 12))]
    assert [x["init"] for x in s] == ["scratch", "warm", "warm", "warm"]
    assert s[3]["train"]["data"] == "::".join(f"tic/train/{y}" for y in range(2014, 2020))


def test_cumulative_exp():
    s = plan("cumulative-exp")["steps"]
    assert mix(s[1]) == [((2014, 2015, 2016), "replay", 400, 0.5), ((2017,), "new", 400, 0.5)]
    assert mix(s[2]) == [((2014, 2015, 2016), "replay", 200, 0.25), ((2017,), "replay", 200, 0.25),
                         ((2018,), "new", 400, 0.5)]
    assert mix(s[3]) == [((2014, 2015, 2016), "replay", 150, 0.125), ((2017,), "replay", 150, 0.125),
                         ((2018,), "replay", 300, 0.25), ((2019,), "new", 600, 0.5)]
    r = s[3]["data"][0]
    assert r["fraction"] == 150 / 400 and r["available"] == 400 and r["capped"] is False
    assert r["make"] == {"filter": "filters/tic/replay.sql",
                         "set": {"first_year": 2014, "last_year": 2016, "samples": 150, "seed": 0}}
    assert s[3]["data"][2]["make"]["set"]["samples"] == 300 and s[3]["data"][2]["fraction"] == 0.75  # of 2018's 400
    assert [x["init"] for x in s] == ["scratch", "warm", "warm", "warm"]


def test_cumulative_equal():
    s = plan("cumulative-equal")["steps"]
    assert mix(s[2]) == [((2014, 2015, 2016), "replay", 200, 0.25), ((2017,), "replay", 200, 0.25),
                         ((2018,), "new", 400, 0.5)]
    assert [d["samples"] for d in s[3]["data"]] == [200, 200, 200, 600]
    assert [d["fraction"] for d in s[3]["data"]] == [0.5, 0.5, 0.5, 1.0]


def test_restart_trains_from_scratch_on_all_data():
    s = plan("restart")["steps"]
    assert [x["init"] for x in s] == ["scratch"] * 4
    assert [x["train"]["warmup"] for x in s] == [500] * 4
    assert [x["train"]["resume"] for x in s] == ["latest"] * 4
    assert [sum(d["samples"] for d in x["data"]) for x in s] == [400, 800, 1200, 1800]


def test_oracle_is_one_run_with_t_times_the_budget():
    p = plan("oracle")
    (s,) = p["steps"]
    assert s["name"] == "2019" and s["init"] == "scratch" and s["train"]["train_num_samples"] == 4000
    assert [d["years"] for d in s["data"]] == [[y] for y in range(2014, 2020)]


def test_buffer_option_and_capping():
    s = plan("cumulative-equal", buffer=1000)["steps"]
    r = s[1]["data"][0]
    assert (r["samples"], r["capped"], r["fraction"]) == (400, True, 1.0)  # only 400 in step 1
    s = plan("cumulative-exp", buffer=100)["steps"]
    assert [d["samples"] for d in s[3]["data"]] == [25, 25, 50, 600]


def test_plan_files_round_trip(tmp_path):
    p = plan("cumulative-exp")
    write_plan(p, tmp_path / "p.json")
    write_plan(p, tmp_path / "p.yaml")
    assert read_plan(tmp_path / "p.json") == p == read_plan(tmp_path / "p.yaml")
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(CurateError, match="not a curate TiC plan"):
        read_plan(tmp_path / "bad.json")


@pytest.mark.parametrize("steps, message", [
    ("2017,2016", "years must increase"),
    ("2016,2031", "year 2031 is out of range 2014..2023"),
    ("2016,20x7", "'20x7' is not a year"),
    ("", "--steps is empty"),
])
def test_bad_steps(steps, message):
    with pytest.raises(CurateError, match=message):
        parse_steps(steps)


def test_missing_size_and_bad_budget():
    with pytest.raises(CurateError, match="no size for year 2020"):
        make_plan("sequential", [2016, 2020], 10, SIZES)
    with pytest.raises(CurateError, match="--budget 0"):
        make_plan("sequential", STEPS, 0, SIZES)


def test_cli_plan(tmp_path):
    (tmp_path / "yearly").mkdir()
    (tmp_path / "yearly" / "sizes.json").write_text(json.dumps(SIZES))
    r = CliRunner().invoke(main, ["tic", "plan", "--strategy", "cumulative-exp", "--steps", "2016,2017,2018,2019",
                                  "--budget", "1000", "--sizes", str(tmp_path), "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert "step 2019: warm" in r.output and "wrote" in r.output
    p = json.loads((tmp_path / "p.json").read_text())
    assert [d["samples"] for d in p["steps"][3]["data"]] == [150, 150, 300, 600]
    assert p["steps"][0]["train"]["warmup"] == 500  # tic_medium's warmup
    r = CliRunner().invoke(main, ["tic", "plan", "--strategy", "sequential", "--steps", "2016,2015",
                                  "--sizes", str(tmp_path), "--out", str(tmp_path / "q.json")])
    assert r.exit_code == 1 and "error: --steps '2016,2015': years must increase" in r.output


def test_first_year_for_other_timestamped_pools():
    # TiC-YFCC15M's groups 2004-08, 2009-10: the first step covers 2004..2008
    assert parse_steps("2008,2010", first_year=2004) == [2008, 2010]
    assert step_years([2008, 2010], first_year=2004) == [[2004, 2005, 2006, 2007, 2008], [2009, 2010]]
    sizes = {y: 10 * (y - 2003) for y in range(2004, 2011)}  # 10, 20, ..., 70
    p = make_plan("cumulative-all", [2008, 2010], 100, sizes, first_year=2004)
    first = p["steps"][0]["data"]
    assert sorted(y for d in first for y in d["years"]) == [2004, 2005, 2006, 2007, 2008]
    with pytest.raises(TicError, match="before the first year"):
        parse_steps("2003,2008", first_year=2004)
    with pytest.raises(TicError, match="out of range"):
        parse_steps("2008,2010")  # TiC-DataComp's range without --first-year


# Years with no training samples (size 0, as `curate tic export` records them): worked by hand.
# years 2014 2015 2016 2017 2018; sizes 100 0 200 0 400.
GAPS = {"2014": 100, "2015": 0, "2016": 200, "2017": 0, "2018": 400}


@pytest.mark.parametrize("strategy, steps, want", [
    # [[(years, role, samples), ...] per step]: zero-size years are left out of every mixture
    ("sequential", [2016, 2018], [[((2014,), "new", 100), ((2016,), "new", 200)], [((2018,), "new", 400)]]),
    ("cumulative-all", [2016, 2018], [[((2014,), "new", 100), ((2016,), "new", 200)],
                                      [((2014,), "old", 100), ((2016,), "old", 200), ((2018,), "new", 400)]]),
    ("restart", [2015, 2018], [[((2014,), "new", 100)],
                               [((2014,), "old", 100), ((2016,), "new", 200), ((2018,), "new", 400)]]),
    # step 2 (2017..2018) has 400 new samples: B = 400, all of it to step 1, capped at its 300
    ("cumulative-exp", [2016, 2018], [[((2014,), "new", 100), ((2016,), "new", 200)],
                                      [((2014, 2015, 2016), "replay", 300), ((2018,), "new", 400)]]),
    ("oracle", [2016, 2018], [[((2014,), "new", 100), ((2016,), "new", 200), ((2018,), "new", 400)]]),
    # a step whose every year is empty: refused in one line
    ("sequential", [2016, 2017, 2018], "step 2017 (years 2017..2017): no training samples"),
    ("oracle", [2016, 2017, 2018], "step 2017 (years 2017..2017): no training samples"),
])
def test_zero_size_years_are_skipped(strategy, steps, want):
    if isinstance(want, str):
        with pytest.raises(TicError, match=want.replace("(", r"\(").replace(")", r"\)")) as e:
            make_plan(strategy, steps, 1000, GAPS)
        assert "\n" not in str(e.value)
        return
    p = make_plan(strategy, steps, 1000, GAPS)
    got = [[(tuple(d["years"]), d["role"], d["samples"]) for d in s["data"]] for s in p["steps"]]
    assert got == want
    for s in p["steps"]:
        assert all(d["samples"] > 0 for d in s["data"])
        assert sum(d["probability"] for d in s["data"]) == pytest.approx(1.0)
    assert p["sizes"] == {k: v for k, v in GAPS.items() if int(k) <= steps[-1]}


def test_cli_plan_refuses_an_empty_step(tmp_path):
    (tmp_path / "yearly").mkdir()
    (tmp_path / "yearly" / "sizes.json").write_text(json.dumps({"2014": 0, "2015": 0, "2016": 5}))
    r = CliRunner().invoke(main, ["tic", "plan", "--strategy", "sequential", "--steps", "2015,2016",
                                  "--sizes", str(tmp_path), "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("error: step 2015 (years 2014..2015): no training samples in ")
    assert not (tmp_path / "p.json").exists()
