"""The worker's load probe: what vLLM's stat-logger hook hands it per engine step becomes the
load its heartbeats carry, prefix-cache counters included. The stats are vLLM's own classes,
filled the way its scheduler fills them (`PrefixCacheStats.record` once per request looked up)."""

from __future__ import annotations

from typing import Any

from vllm.v1.metrics.stats import PrefixCacheStats, SchedulerStats

from vpool.registry.records import WorkerLoad
from vpool.worker.vllm_adapter import _LoadProbe


def _step(*lookups: tuple[int, int, bool], reset: bool = False, running: int = 0) -> SchedulerStats:
    """One engine step's stats: each lookup is (prompt tokens, tokens found cached, preempted)."""
    prefix = PrefixCacheStats(reset=reset)
    for tokens, hits, preempted in lookups:
        prefix.record(num_tokens=tokens, num_hits=hits, preempted=preempted)
    return SchedulerStats(num_running_reqs=running, kv_cache_usage=0.25, prefix_cache_stats=prefix)


def _recorder(probe: _LoadProbe) -> Any:
    """The stat logger vLLM builds from the factory the worker hands it."""
    return probe.factory(vllm_config=None, engine_index=0)


def test_a_fresh_engine_reports_no_prefix_cache_lookups() -> None:
    load = _LoadProbe().load(unfinished=0)
    assert (load.prefix_cache_queries, load.prefix_cache_hits) == (0, 0)


def test_the_heartbeat_carries_the_prefix_cache_tokens_added_up_over_engine_steps() -> None:
    probe = _LoadProbe()
    recorder = _recorder(probe)
    # A 2,000-token prompt with nothing cached, then the same system prompt twice: vLLM finds
    # whole blocks of it (16 tokens each) in its cache.
    recorder.record(_step((2000, 0, False), running=1), None)
    recorder.record(_step((2100, 1984, False), (2050, 1984, False), running=3), None)
    recorder.record(_step(running=2), None)  # a decode-only step looks nothing up
    recorder.record(None, None)  # an output batch without scheduler stats
    load = probe.load(unfinished=2)
    assert load == WorkerLoad(
        running=2, kv_cache_usage=0.25, prefix_cache_queries=6150, prefix_cache_hits=3968
    )


def test_requests_resumed_after_preemption_are_not_counted_twice() -> None:
    """As in vLLM's own `vllm:prefix_cache_queries_total`: a resumed request's second lookup is
    kept apart, so the hit rate stays that of the traffic, not of the engine's memory pressure."""
    probe = _LoadProbe()
    recorder = _recorder(probe)
    recorder.record(_step((500, 0, False)), None)
    recorder.record(_step((500, 480, True), (300, 0, False)), None)
    load = probe.load(unfinished=0)
    assert (load.prefix_cache_queries, load.prefix_cache_hits) == (800, 0)


def test_the_counters_only_grow_when_the_engine_resets_its_prefix_cache() -> None:
    """Prometheus takes a drop for a restart; a cache reset is not one, so the totals go on."""
    probe = _LoadProbe()
    recorder = _recorder(probe)
    recorder.record(_step((1000, 900, False)), None)
    before = probe.load(unfinished=0)
    recorder.record(_step((1000, 0, False), reset=True), None)
    after = probe.load(unfinished=0)
    assert (before.prefix_cache_queries, before.prefix_cache_hits) == (1000, 900)
    assert (after.prefix_cache_queries, after.prefix_cache_hits) == (2000, 900)
