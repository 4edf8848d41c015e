"""Routing: a requested model resolved into ordered upstream targets, their health and circuits,
and the choice among a provider's managed upstream keys."""
