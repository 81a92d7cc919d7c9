"""Infrastructure every Allot service uses: settings, bootstrap, clock, database, errors, auth.

Generated stubs live in `shared/gen` and import each other as top-level `allot.*` (protoc's
convention); `make venv` puts that folder on the virtual environment's path with a .pth file.
"""
