"""fastbp bench bookkeeping: combining rounds and the table (timings are never asserted)."""
import json
import subprocess
import sys

from fastbp import bench


def _r(ms):
    return {"median_s": ms / 1e3, "n": 10}


def test_rounds_combine_to_the_median_and_per_round_ratios():
    rounds = [{"fastbp": _r(1.0), "jax": _r(2.0)},
              {"fastbp": _r(3.0), "jax": _r(2.0)},
              {"fastbp": _r(2.0), "jax": _r(4.0)}]
    out = bench._combine(rounds, ["fastbp", "jax"])
    assert out["fastbp"]["median_s"] == 2.0e-3
    assert out["jax"]["median_s"] == 2.0e-3
    assert out["fastbp"]["n"] == 30
    assert out["ratios"] == [0.5, 1.5, 0.5]


def test_a_failed_peer_round_is_left_out_and_errors_survive():
    rounds = [{"fastbp": _r(1.0), "torch": {"error": "timeout"}},
              {"fastbp": _r(3.0), "torch": _r(2.0)}]
    out = bench._combine(rounds, ["fastbp", "torch"])
    assert out["torch"]["median_s"] == 2.0e-3
    assert out["ratios"] == [1.5]
    never = bench._combine([{"fastbp": _r(1.0), "torch": {"error": "x"}}] * 2,
                           ["fastbp", "torch"])
    assert never["torch"] == {"error": "x"} and "ratios" not in never


def test_table_shows_the_ratio_range_over_rounds():
    res = {"rounds": 2, "gemm_peak_gflops": 100.0,
           "results": {"lstm_tiny": {"fastbp": _r(1.0), "jax": _r(4.0),
                                     "ratios": [0.2, 0.3]}}}
    table = bench.format_table(res)
    row = [ln for ln in table.splitlines() if ln.startswith("| lstm_tiny")][0]
    assert "| 0.25 | 0.20-0.30 | ≤ 0.5 |" in row
    assert "per-round ratios" in table.splitlines()[0]


def test_cli_rounds_json(tmp_path):
    out = tmp_path / "b.json"
    subprocess.run([sys.executable, "-m", "fastbp.bench", "--workloads", "mlp_small",
                    "--peers", "fastbp", "--rounds", "2", "--repeat", "3", "--budget", "0.01",
                    "--json", str(out)], check=True, capture_output=True, timeout=600)
    res = json.loads(out.read_text())
    r = res["results"]["mlp_small"]["fastbp"]
    assert res["rounds"] == 2 and len(r["rounds_s"]) == 2 and r["median_s"] > 0
    if bench.cpu_times() is not None:                    # Linux: steal measured per round
        assert len(r["steal_rounds"]) == 2 and all(0 <= s <= 1 for s in r["steal_rounds"])


def test_peers_run_without_fastbps_environment_defaults(monkeypatch):
    """PyTorch and JAX workers get the user's environment: no OMP_WAIT_POLICY=PASSIVE that
    fastbp filled in, fastbp's defaults off, no MKL; fastbp's own worker keeps them."""
    from fastbp import bench, config
    monkeypatch.setattr(config, "SET_BY_FASTBP", ["OMP_WAIT_POLICY"])
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("FASTBP_MKL", "1")
    for peer in ("torch", "jax"):
        env = bench._thread_env(2, peer)
        assert "OMP_WAIT_POLICY" not in env
        assert env["FASTBP_ENV_DEFAULTS"] == "0" and env["FASTBP_MKL"] == "0"
        assert env["OMP_NUM_THREADS"] == "2"
    env = bench._thread_env(2, "fastbp")
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["FASTBP_MKL"] == "1"
    monkeypatch.setattr(config, "SET_BY_FASTBP", [])          # the user's own setting stays
    assert bench._thread_env(2, "torch")["OMP_WAIT_POLICY"] == "PASSIVE"


def test_steal_share_from_proc_stat_lines(tmp_path):
    """CPU steal between two /proc/stat readings: Δsteal over the Δ of the first eight
    counters (guest time is already inside user/nice)."""
    f = tmp_path / "stat"
    f.write_text("cpu  100 0 50 800 0 0 0 50 7 7\ncpu0 1 2 3\n")
    before = bench.cpu_times(str(f))
    assert before == (100, 0, 50, 800, 0, 0, 0, 50, 7, 7)
    f.write_text("cpu  160 0 60 880 0 0 0 100 9 9\n")
    after = bench.cpu_times(str(f))
    assert bench.steal_share(before, after) == 50 / 200
    assert bench.steal_share(before, before) is None           # no time passed
    assert bench.steal_share(None, after) is None
    assert bench.cpu_times(str(tmp_path / "missing")) is None
    f.write_text("intr 1 2 3\n")
    assert bench.cpu_times(str(f)) is None


def test_table_flags_workloads_measured_under_steal():
    def r(ms, steal):
        return {"median_s": ms / 1e3, "n": 10, "steal": steal}
    rounds = [{"fastbp": r(1.0, 0.01), "jax": r(2.0, 0.30)},
              {"fastbp": r(1.0, 0.02), "jax": r(2.0, 0.00)}]
    out = bench._combine(rounds, ["fastbp", "jax"])
    assert out["jax"]["steal_rounds"] == [0.30, 0.00] and "tries_rounds" not in out["jax"]
    rounds[0]["jax"]["tries"] = 3
    assert bench._combine(rounds, ["fastbp", "jax"])["jax"]["tries_rounds"] == [3, 1]
    quiet = bench._combine([{"fastbp": r(1.0, 0.0), "jax": r(2.0, 0.01)}] * 2,
                           ["fastbp", "jax"])
    res = {"rounds": 2, "gemm_peak_gflops": 100.0,
           "results": {"mlp_small": out, "lstm_tiny": quiet}}
    table = bench.format_table(res)
    lines = table.splitlines()
    assert lines[0].endswith(" CPU steal |")
    assert [ln for ln in lines if ln.startswith("| mlp_small")][0].endswith(" 30% |")
    assert [ln for ln in lines if ln.startswith("| lstm_tiny")][0].endswith(" 1% |")
    assert "while mlp_small ran" in table and "lstm_tiny ran" not in table
    plain = {"rounds": 1, "results": {"mlp_small": {"fastbp": _r(1.0), "jax": _r(2.0)}}}
    assert "steal" not in bench.format_table(plain)


def test_max_steal_repeats_disturbed_measurements(monkeypatch):
    """With max_steal, a measurement taken under more steal is repeated (at most `retries`
    more times) and the least disturbed one is kept; errors are not retried."""
    seq = {"fastbp": [0.40, 0.20, 0.30], "jax": [0.01], "torch": [{"error": "x"}]}
    calls = []

    def fake(peer, name, threads, repeat, budget, timeout=900):
        calls.append(peer)
        if peer == "peak":
            return {"gflops": 1.0}
        v = seq[peer].pop(0)
        return v if isinstance(v, dict) else {"median_s": 1e-3 * (1 + v), "n": 5, "steal": v}

    monkeypatch.setattr(bench, "run_one", fake)
    res = bench.run(["mlp_small"], 2, peers=["fastbp", "jax", "torch"], progress=None,
                    max_steal=0.05, retries=2)
    r = res["results"]["mlp_small"]
    assert calls.count("fastbp") == 3 and calls.count("jax") == 1 and calls.count("torch") == 1
    assert r["fastbp"]["steal"] == 0.20 and r["fastbp"]["tries"] == 3
    assert "tries" not in r["jax"] and r["torch"] == {"error": "x"}
    assert res["max_steal"] == 0.05
    seq.update(fastbp=[0.40], jax=[0.01], torch=[{"error": "x"}])
    calls.clear()
    bench.run(["mlp_small"], 2, peers=["fastbp", "jax", "torch"], progress=None)
    assert calls.count("fastbp") == 1                    # no limit: measured once


def test_cli_rejects_bad_max_steal():
    for bad in (["--max-steal", "1.5"], ["--retries", "-1"]):
        p = subprocess.run([sys.executable, "-m", "fastbp.bench", *bad], capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 2 and ("max-steal" in p.stderr or "retries" in p.stderr)
