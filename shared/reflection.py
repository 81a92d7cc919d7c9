"""Server reflection that serves the protos' comments, so `grpcurl describe` shows them.

grpc_reflection answers with the files of a descriptor pool, each written out with
`FileDescriptor.CopyToProto`, which leaves out the source info (the comments): the pool keeps
none. `make proto` also writes our protos' descriptors *with* source info into
shared/gen/allot_descriptor_set.pb (`protoc --include_source_info`). `SourcePool` finds
descriptors in the process's pool as grpc_reflection would, and writes out each of our files
from that descriptor set instead; files it does not hold (google/protobuf, health, reflection)
are served as before. A file of the set is used only when it is the very file the process
loaded (source info aside), so a stale set can never describe another contract than the one
served: such a file is served without comments and a warning is logged.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Iterable

from google.protobuf import descriptor_pb2, descriptor_pool

DESCRIPTOR_SET = pathlib.Path(__file__).resolve().parent / "gen" / "allot_descriptor_set.pb"

log = logging.getLogger("allot.reflection")


def load_sources(
    path: pathlib.Path = DESCRIPTOR_SET,
) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """The files of the descriptor set at `path`, by name ({} when there is none)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        log.warning("no descriptor set at %s: reflection serves no comments", path)
        return {}
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    return {file.name: _without_json_names(file) for file in files}


def _without_json_names(
    file: descriptor_pb2.FileDescriptorProto,
) -> descriptor_pb2.FileDescriptorProto:
    """`file` without the fields' json_name, which protoc writes and the loaded stubs do not:
    served with it, grpcurl would print camelCase names instead of the proto's own (the
    README's examples and every client's JSON use the proto's names)."""
    bare = descriptor_pb2.FileDescriptorProto()
    bare.CopyFrom(file)
    messages = list(bare.message_type)
    while messages:
        message = messages.pop()
        for field in (*message.field, *message.extension):
            field.ClearField("json_name")
        messages.extend(message.nested_type)
    for field in bare.extension:
        field.ClearField("json_name")
    return bare


def _bare(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """`file` without what only protoc writes: source info and fields' json_name."""
    bare = _without_json_names(file)
    bare.ClearField("source_code_info")
    return bare


class _File:
    """A FileDescriptor as grpc_reflection uses it: name, dependencies, CopyToProto."""

    def __init__(self, descriptor, sources: dict[str, descriptor_pb2.FileDescriptorProto]):
        self._descriptor = descriptor
        self._sources = sources
        self.name = descriptor.name

    @property
    def dependencies(self) -> list[_File]:
        return [_File(d, self._sources) for d in self._descriptor.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:  # noqa: N802
        source = self._sources.get(self.name)
        if source is None:
            self._descriptor.CopyToProto(proto)
        else:
            proto.CopyFrom(source)


class SourcePool:
    """The lookups grpc_reflection makes of a DescriptorPool, answered from `pool` (the
    process's default pool), with our files written out with their source info."""

    def __init__(
        self,
        sources: dict[str, descriptor_pb2.FileDescriptorProto],
        pool: descriptor_pool.DescriptorPool | None = None,
    ) -> None:
        self._pool = pool if pool is not None else descriptor_pool.Default()
        self._sources = {name: file for name, file in sources.items() if self._matches_loaded(file)}

    @property
    def commented_files(self) -> Iterable[str]:
        return sorted(self._sources)

    def _matches_loaded(self, file: descriptor_pb2.FileDescriptorProto) -> bool:
        try:
            loaded = self._pool.FindFileByName(file.name)
        except KeyError:
            return True  # not served by this process: never asked for
        served = descriptor_pb2.FileDescriptorProto()
        loaded.CopyToProto(served)
        if _bare(served) == _bare(file):
            return True
        log.warning("%s differs from the descriptor set: run 'make proto'", file.name)
        return False

    def FindFileByName(self, name: str) -> _File:  # noqa: N802
        return _File(self._pool.FindFileByName(name), self._sources)

    def FindFileContainingSymbol(self, symbol: str) -> _File:  # noqa: N802
        try:
            found = self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            # The pool finds services and messages but not their methods and fields
            # (`grpcurl describe allot.quota.v1.QuotaService.ReportUsage`): a member is in
            # the file of its parent.
            parent = symbol.rpartition(".")[0]
            if not parent:
                raise
            found = self._pool.FindFileContainingSymbol(parent)
        return _File(found, self._sources)

    def FindMessageTypeByName(self, name: str):  # noqa: N802
        return self._pool.FindMessageTypeByName(name)

    def FindExtensionByNumber(self, message, number: int):  # noqa: N802
        return self._pool.FindExtensionByNumber(message, number)

    def FindAllExtensions(self, message):  # noqa: N802
        return self._pool.FindAllExtensions(message)
