"""Calibration's reading of a traced run: the disk read rates a run achieved, as the cost model
defines them, and a profile with its disk read rates set to them; the fit of the disk's read
latency and rates from the probes' reads."""
from __future__ import annotations

import os
import statistics

import networkx as nx
import numpy as np
import pytest

from executors.trace import Event
from graphgen.build import build_graph
from graphgen.config import compose
from graphgen.models import build_spec, hf_config_from_arch
from graphgen.perf.calibrate import disk_reads, fit_disk_reads, fit_relative, observed_disk_rates, with_disk_rates
from graphgen.perf.probes import small_read_times
from graphgen.perf.costmodel import CostModel, simulate
from passes import run_pipeline

TINY = {"model_type": "opt", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "ffn_dim": 128,
        "num_attention_heads": 4, "max_position_embeddings": 128, "word_embed_proj_dim": 32}
PROFILE = {"device_flops_float32": 1e11, "device_flops_decode_float32": 5e10, "device_bmm_flops_float32": 5e10,
           "device_attn_bw": 2e10, "cpu_attn_bw": 2e10, "device_mem_bw": 2e10, "disk_read_bw": 2e9,
           "disk_read_cache_bw": 1e9, "disk_write_bw": 1e9, "disk_latency_s": 1e-3}


def ev(name, stream: str, start: float, end: float) -> Event:
    return Event(stream, str(name), start, end, 0, {})


def synthetic():
    """Two weight reads from disk (200 MB in 0.102 s), a KV cache prefix read (10 MB in 0.011 s),
    and ops that are not disk reads: a cache slice written to disk, a weight load from the host,
    a zero-byte load from disk, a square."""
    g = nx.DiGraph()
    ops = {"w0": ("load", "disk", "device", ("w", 0), 100_000_000, 0.051),
           "w1": ("load", "disk", "device", ("w", 1), 100_000_000, 0.051),
           "kv": ("load", "disk", "device", ("kv", 1, 0), 10_000_000, 0.011),
           "kv_out": ("store", "device", "disk", ("kv", 1, 0), 1_000_000, 0.5),
           "w_host": ("load", "host", "device", ("w", 2), 50_000_000, 0.5),
           "empty": ("load", "disk", "device", ("act", 0), 0, 0.5)}
    events = []
    for name, (op, src, dst, tensor, nbytes, t) in ops.items():
        g.add_node(name, op=op, src=src, dst=dst, tensor=tensor, bytes=nbytes)
        events.append(ev(name, op, 1.0, 1.0 + t))
    g.add_node((0, 1, 0), kind="mlp")
    events.append(ev((0, 1, 0), "compute", 0.0, 2.0))
    return g, events


def test_disk_reads_counts_only_reads_from_disk():
    g, events = synthetic()
    got = disk_reads(g, events)
    assert set(got) == {"disk_read_bw", "disk_read_cache_bw"}
    assert got["disk_read_bw"][:2] == (2, 200_000_000) and got["disk_read_bw"][2] == pytest.approx(0.102)
    assert got["disk_read_cache_bw"][:2] == (1, 10_000_000) and got["disk_read_cache_bw"][2] == pytest.approx(0.011)


def test_observed_rates_take_the_latency_out_as_the_model_prices_it():
    g, events = synthetic()
    rates = observed_disk_rates(g, events, latency_s=1e-3)
    assert rates["disk_read_bw"] == pytest.approx(200e6 / (0.102 - 2e-3))  # 2.0 GB/s
    assert rates["disk_read_cache_bw"] == pytest.approx(10e6 / (0.011 - 1e-3))  # 1.0 GB/s
    # reads no longer than their latency: no rate explains them, so none is reported
    assert observed_disk_rates(g, events, latency_s=0.06) == {}
    assert observed_disk_rates(nx.DiGraph(), [], 1e-3) == {}  # a run that read nothing from disk


def test_with_disk_rates_replaces_only_the_read_keys():
    prof = dict(PROFILE)
    out = with_disk_rates(prof, {"disk_read_bw": 1e9})
    assert out["disk_read_bw"] == 1e9 and out["disk_read_cache_bw"] == 1e9 and prof["disk_read_bw"] == 2e9
    assert {k: v for k, v in out.items() if k != "disk_read_bw"} == {k: v for k, v in prof.items() if k != "disk_read_bw"}
    with pytest.raises(ValueError, match="disk_write_bw"):
        with_disk_rates(prof, {"disk_write_bw": 1e9})


def test_rates_of_a_run_priced_by_the_model_are_the_model_rates():
    """A compiled graph with weights and cache on disk, each load 'measured' at what the cost model
    prices it at other rates: the observed rates are those rates, and the profile set to them
    predicts the run the model made of them."""
    cfg = compose(["model=opt-125m", "model.dtype=float32", "executor=async", "policy.percent=[0,0,0,0,100,0]",
                   "policy.cpu_attention=true"])
    cfg.hardware.profile = dict(PROFILE)
    g = run_pipeline(build_graph(build_spec(hf_config_from_arch(TINY)), batch=4, num_batches=2, prompt_len=16,
                                 gen_len=4, dtype="float32"), cfg)
    truth = with_disk_rates(PROFILE, {"disk_read_bw": 0.7e9, "disk_read_cache_bw": 0.4e9})
    run = CostModel(truth, "float32", "cpu")
    events = [ev(n, "load", 0.0, run.io_s(a)) for n, a in g.nodes(data=True) if a.get("op") == "load"]
    rates = observed_disk_rates(g, events, PROFILE["disk_latency_s"])
    assert rates == {"disk_read_bw": pytest.approx(0.7e9), "disk_read_cache_bw": pytest.approx(0.4e9)}
    scaled = simulate(g, CostModel(with_disk_rates(PROFILE, rates), "float32", "cpu"))
    assert scaled.total_tok_s == pytest.approx(simulate(g, run).total_tok_s)
    assert scaled.total_tok_s < simulate(g, CostModel(PROFILE, "float32", "cpu")).total_tok_s  # a slower disk


LAT, BW, CACHE_BW = 1e-4, 2.0e9, 1.4e9  # the synthetic disk: 0.1 ms per read, weights 2 GB/s, cache 1.4 GB/s


def probe_reads(small_rate: float, seed: int, sigma: float = 0.1):
    """Reads shaped as calibration's probes make them (weights 4.7-206 MB, cache prefixes 12.7 MB,
    counts as in one calibration) and 20 reads of 4 KiB, each time x lognormal noise of mean 1
    (sigma, seeded); the weight reads under 8 MiB (those of the opt-125m probe, a run apart from
    opt-1.3b's) at small_rate x the rate: in one calibration on this machine's disk they ran at 0.6x."""
    rng = np.random.default_rng(seed)
    noise = lambda n: np.exp(rng.normal(-sigma ** 2 / 2, sigma, n))  # noqa: E731
    reads = []
    for nbytes, count in ((4_700_000, 160), (9_400_000, 160), (33_600_000, 32), (67_100_000, 32), (206_000_000, 16)):
        rate = BW * (small_rate if nbytes < 8 << 20 else 1.0)
        reads += [(nbytes, (LAT + nbytes / rate) * e) for e in noise(count)]
    cache = [(12_700_000, (LAT + 12_700_000 / CACHE_BW) * e) for e in noise(280)]
    return reads, cache, list(LAT * noise(20))


def old_fit(reads, cache):
    """The fit before: on relative error, latency and weight rate from the weight reads alone, the
    cache's rate net of that latency."""
    lat, inv = fit_relative(np.array([[1.0, n] for n, _ in reads]), np.array([t for _, t in reads]))
    n, t = np.array([[float(n)] for n, _ in cache]), np.array([t - lat for _, t in cache])
    return lat, 1 / inv, 1 / fit_relative(n[t > 0], t[t > 0])[0]


def priced(pts, latency_s: float, rate: float) -> float:
    """The reads' seconds as the cost model prices them, over the seconds they took."""
    return sum(latency_s + n / rate for n, _ in pts) / sum(t for _, t in pts)


def test_a_latency_measured_apart_holds_where_the_probes_reads_swing_it():
    """The probes' reads alone leave the intercept to how their rate differs between probe runs:
    two draws a little apart give latencies > 1 ms and 0, and cache rates 15% apart. Measured
    from 4 KiB reads, the latency is the true one within 10% in both, and the rates within 5%
    (the weight rate: of the 2 GB/s the large reads, most of the seconds, ran at)."""
    draws = [probe_reads(0.65, 1), probe_reads(1.1, 2)]
    old = [old_fit(r, c) for r, c, _ in draws]
    assert old[0][0] > 10 * LAT and old[1][0] == 0.0  # the latency swings
    assert old[0][2] > 1.15 * old[1][2]  # and the cache's rate, fitted net of it, with it
    for reads, cache, small in draws:
        lat = statistics.median(small)
        got = fit_disk_reads(reads, cache, lat)
        assert lat == pytest.approx(LAT, rel=0.1)
        assert got["disk_read_bw"] == pytest.approx(BW, rel=0.05)
        assert got["disk_read_cache_bw"] == pytest.approx(CACHE_BW, rel=0.05)
        assert priced(reads, lat, got["disk_read_bw"]) == pytest.approx(1.0)  # all their seconds, as a run's
        assert priced(cache, lat, got["disk_read_cache_bw"]) == pytest.approx(1.0)


def test_rates_price_the_seconds_the_reads_took():
    """Reads whose times spread by 30% (as the probes' do here): rates fitted on relative error
    come out > 10% fast and price the reads > 10% short; the bytes over the seconds, net of the
    latency, are the true rates within 5%."""
    reads, cache, small = probe_reads(1.0, 3, sigma=0.3)
    lat, bw, cache_bw = old_fit(reads, cache)
    assert bw > 1.1 * BW and cache_bw > 1.1 * CACHE_BW
    assert priced(reads, lat, bw) < 0.9 and priced(cache, lat, cache_bw) < 0.9
    got = fit_disk_reads(reads, cache, statistics.median(small))
    assert got == {"disk_read_bw": pytest.approx(BW, rel=0.05), "disk_read_cache_bw": pytest.approx(CACHE_BW, rel=0.05)}


def test_fit_disk_reads_leaves_out_what_it_cannot_rate():
    reads, cache, _ = probe_reads(1.0, 4)
    assert fit_disk_reads([], [], LAT) == {}
    assert set(fit_disk_reads(reads, cache[:1], LAT)) == {"disk_read_bw"}  # one cache read: no rate
    assert set(fit_disk_reads([], cache, LAT)) == {"disk_read_cache_bw"}  # the KV cache on disk alone
    assert set(fit_disk_reads(reads, cache, latency_s=0.01)) == {"disk_read_bw"}  # cache reads of ~9 ms cannot
    # each hold 10 ms of latency: no rate explains them


def test_small_read_times_reads_through_the_tier_and_cleans_up(tmp_path):
    times = small_read_times(str(tmp_path), repeats=5)
    assert len(times) == 5 and all(0 < t < 1 for t in times)
    assert [f for _, _, fs in os.walk(tmp_path) for f in fs] == []  # the probe file is gone
