"""Consuming another service's `WatchEvents` stream exactly once (docs/faults.md, "Streams").

- `lease`: the cursor and lease tables in the consuming service's own database, and the SQL
  that takes, extends and gives up the lease and moves the cursor;
- `backoff`: the bounded, jittered pause between attempts;
- `consumer`: `StreamConsumer`, the loop that applies a stream's events in transactions;
- `subscriptions`: `Subscriptions`, the streams one service follows over gRPC (channel,
  credentials, request, task lifecycle and bounded stop).
"""
