"""Options of the gRPC channels between the suite's services, and of the servers' keepalive
(docs/faults.md, "The network between the services")."""

from __future__ import annotations

import json

# Options for the channel a consumer watches through. gRPC's own reconnect backoff grows to
# two minutes by default, which would hold a consumer off a producer that is back long after
# its own backoff (at most 5 s) says to try again.
#
# A connection that died silently (a failover without reset: nothing errors, nothing arrives;
# docs/faults.md, "The network between the services") is found by keepalive: a ping after
# KEEPALIVE_SECONDS without reading anything, and the connection dropped when no ack comes
# within KEEPALIVE_SECONDS more, so it is dialled again about 10 s after it went silent. The
# ack wait is `grpc.http2.ping_timeout_ms`: gRPC (1.85) waits that long (default one minute)
# for any ping, keepalive ones included, so `grpc.keepalive_timeout_ms` alone does not
# shorten it. By default gRPC sends only two pings while no data flows
# (`grpc.http2.max_pings_without_data`), so a stream idle for 10 s would no longer be checked
# and a consumer would wait on it long after it died; 0 lifts that limit. Allot's servers
# accept a ping every 2 s (`grpc.http2.min_ping_interval_without_data_ms` in shared/server.py).
KEEPALIVE_SECONDS = 5
# The same keepalive on both ends of every connection between the services: outbound channels
# (CHANNEL_OPTIONS) and the servers (shared/server.py), which ping their callers this way.
KEEPALIVE_OPTIONS = (
    ("grpc.keepalive_time_ms", KEEPALIVE_SECONDS * 1000),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_SECONDS * 1000),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_SECONDS * 1000),
    ("grpc.http2.max_pings_without_data", 0),
)

# gRPC's own retry (docs/faults.md, "Callers classify codes"): a call answered UNAVAILABLE
# (quota starting, its database away, a connection refused) is tried again twice more within
# its deadline. Every call on these channels may be repeated: billing's commands to quota carry
# request ids, the rest are reads and streams (a stream is only retried before its first
# message). Other codes are left to the callers, which retry later on their own schedule.
#
# Calls are spread over every address the target resolves to (`round_robin`; gRPC's default,
# `pick_first`, sends everything to the first). With `dns:///name:port` and a headless
# Kubernetes Service the name resolves to every ready replica, so one caller's calls reach all
# of them (deploy/README.md, "Scaling"); a plain host:port that resolves to one address is
# unchanged.
RETRY_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{}],  # every method of every service
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5000),
    *KEEPALIVE_OPTIONS,
    ("grpc.enable_retries", 1),
    ("grpc.service_config", RETRY_SERVICE_CONFIG),
)
