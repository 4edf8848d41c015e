"""Billing: exact prices, the balance a user reads, the durable way ledger and log rows reach SQL,
and reconciling Redis with the ledger."""
