"""Every side effect of an incident, each an activity with a timeout, a retry policy and an idempotency key."""
