#!/usr/bin/python3
"""tests/service/reflection_client.py — drives a running blockmetad through
server reflection only: no compiled stubs of blockmeta's protos, as grpcurl
does. Generates the reflection protocol's Python classes from Debian's
grpc-proto at run time, lists services, describes them, builds message
classes from the served descriptors, and calls GetExtents (JSON in, JSON
out) and grpc.health.v1.Health/Check.

usage: reflection_client.py HOST:PORT OUT_DIR EXPORT
prints one JSON document with what it found; exits non-zero on any error.
"""
import json
import os
import sys

import grpc
from grpc_tools import protoc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format
from google.protobuf import message_factory


def main():
    target, out_dir, export = sys.argv[1], sys.argv[2], sys.argv[3]
    # The generated package "grpc.reflection" must not shadow grpcio's
    # "grpc": generate into a directory whose grpc/ is a namespace we extend.
    gen = os.path.join(out_dir, "gen")
    os.makedirs(gen, exist_ok=True)
    src = "/usr/share/grpc-proto"
    if protoc.main(["protoc", f"-I{src}", f"--python_out={gen}",
                    f"--grpc_python_out={gen}",
                    f"{src}/grpc/reflection/v1alpha/reflection.proto"]) != 0:
        raise SystemExit("protoc failed")
    grpc.__path__.append(os.path.join(gen, "grpc"))
    from grpc.reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(target)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    def ask(**kw):
        req = reflection_pb2.ServerReflectionRequest(**kw)
        resp = next(iter(stub.ServerReflectionInfo(iter([req]), timeout=10)))
        if resp.HasField("error_response"):
            raise SystemExit(f"reflection error: {resp.error_response}")
        return resp

    services = sorted(s.name for s in
                      ask(list_services="").list_services_response.service)

    pool = descriptor_pool.DescriptorPool()
    added = set()

    def add_files(symbol):
        resp = ask(file_containing_symbol=symbol)
        protos = [descriptor_pb2.FileDescriptorProto.FromString(b)
                  for b in resp.file_descriptor_response.file_descriptor_proto]
        # Dependencies first (reflection may send them in any order).
        pending = {p.name: p for p in protos if p.name not in added}
        while pending:
            progressed = False
            for name, p in list(pending.items()):
                if all(d in added or d not in pending for d in p.dependency):
                    try:
                        pool.Add(p)
                    except TypeError:
                        pass
                    added.add(name)
                    del pending[name]
                    progressed = True
            if not progressed:
                raise SystemExit("cyclic descriptors?")

    described = {}
    for svc in ("blockmeta.v1.BlockMeta", "csi.v1.SnapshotMetadata",
                "grpc.health.v1.Health"):
        add_files(svc)
        sd = pool.FindServiceByName(svc)
        described[svc] = sorted(m.name for m in sd.methods)

    def call(method_full, req_json):
        svc, method = method_full.rsplit("/", 1)
        md = pool.FindServiceByName(svc).FindMethodByName(method)
        req_cls = message_factory.GetMessageClass(md.input_type) \
            if hasattr(message_factory, "GetMessageClass") else \
            message_factory.MessageFactory(pool).GetPrototype(md.input_type)
        resp_cls = message_factory.GetMessageClass(md.output_type) \
            if hasattr(message_factory, "GetMessageClass") else \
            message_factory.MessageFactory(pool).GetPrototype(md.output_type)
        req = json_format.Parse(json.dumps(req_json), req_cls())
        fn = channel.unary_unary(f"/{svc}/{method}",
                                 request_serializer=lambda m: m.SerializeToString(),
                                 response_deserializer=resp_cls.FromString)
        try:
            resp = fn(req, timeout=20)
            return {"code": "OK", "body": json_format.MessageToDict(
                resp, preserving_proto_field_name=True)}
        except grpc.RpcError as e:
            return {"code": e.code().name, "message": e.details()}

    result = {
        "services": services,
        "described": described,
        "extents": call("blockmeta.v1.BlockMeta/GetExtents",
                        {"export_name": export, "offset": "0",
                         "length": "67108864"}),
        "bad_extents": call("blockmeta.v1.BlockMeta/GetExtents",
                            {"export_name": "nope", "length": "1"}),
        "health": call("grpc.health.v1.Health/Check", {"service": ""}),
    }
    print(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
