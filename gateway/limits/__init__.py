"""Admission control: request rates, concurrency and token budgets per principal."""
