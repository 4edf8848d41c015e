"""gc_settings.settle_heap: what a replica holds at start-up leaves the collector's sight, and young
passes run less often."""

import gc

from trex_serve.gc_settings import GEN0_THRESHOLD, settle_heap


def test_settle_heap_freezes_what_lives_now_and_raises_the_young_threshold():
    threshold = gc.get_threshold()
    kept = [object() for _ in range(10)]
    try:
        settle_heap()
        assert gc.get_freeze_count() >= len(kept)
        assert gc.get_threshold()[0] == GEN0_THRESHOLD
        assert all(t >= d for t, d in zip(gc.get_threshold(), threshold, strict=True))
        assert gc.collect() >= 0  # collections still run, on what is created from now on
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
