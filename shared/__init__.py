"""Infrastructure every Allot service uses: settings, bootstrap, clock, database, errors, auth.

Generated stubs live in `shared/gen/allot` and import each other as top-level `allot.*` (protoc's
convention); they are the package `allot` of the allot-client distribution (clients/python),
which this one depends on, so `pip install` of both gives importable `allot.quota.v1...`.
"""
