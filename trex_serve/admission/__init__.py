"""Admission: keys, client addresses, risk settings, and the shared counters in Redis (rates,
concurrency, quota, credit reservations) a request spends before any upstream is called."""
