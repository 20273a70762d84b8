"""cc_grpc_proto: one macro that compiles .proto files with the system protoc.

For each `srcs` entry it runs protoc (and, when `grpc = True`, Debian's
grpc_cpp_plugin) and wraps the generated .pb.cc/.grpc.pb.cc in a cc_library
named `name`. Import paths are relative to the package directory, so a
package `proto` with `blockmeta/v1/x.proto` is imported and #included as
`blockmeta/v1/x.proto` / `blockmeta/v1/x.pb.h`. Works in the main
repository and in external (new_local_repository) ones.
"""

def cc_grpc_proto(name, srcs, deps = [], proto_deps = [], grpc = True, alwayslink = False, testonly = False, visibility = None):
    """Generates C++ (and gRPC) code for `srcs` and a cc_library `name`.

    Args:
      name: the cc_library's name.
      srcs: .proto files, relative to this package.
      deps: cc_grpc_proto targets whose protos these import.
      proto_deps: the .proto files of `deps` (filegroups), for protoc's inputs.
      grpc: also run grpc_cpp_plugin.
      alwayslink: link the messages even when no code names them, so their
        descriptors reach the generated pool (for server reflection).
      testonly: mark the generated targets testonly.
      visibility: of the cc_library.
    """
    repo = native.repository_name()
    pkg = native.package_name()
    root = pkg if repo == "@" else ("external/%s/%s" % (repo[1:], pkg)).rstrip("/")
    root = root or "."
    outs = []
    for src in srcs:
        base = src[:-len(".proto")]
        outs += [base + ".pb.h", base + ".pb.cc"]
        if grpc:
            outs += [base + ".grpc.pb.h", base + ".grpc.pb.cc"]
    native.filegroup(name = name + "_protos", srcs = srcs, testonly = testonly, visibility = visibility)
    plugin = " --plugin=protoc-gen-grpc=$$(command -v grpc_cpp_plugin) --grpc_out=$(GENDIR)/%s" % root if grpc else ""
    native.genrule(
        name = name + "_codegen",
        srcs = srcs + proto_deps,
        outs = outs,
        cmd = ("protoc --proto_path=%s --proto_path=/usr/include --cpp_out=$(GENDIR)/%s%s " % (root, root, plugin)) +
              " ".join(["%s/%s" % (root, s) for s in srcs]),
        local = True,
        testonly = testonly,
    )
    native.cc_library(
        name = name,
        srcs = [o for o in outs if o.endswith(".cc")],
        hdrs = [o for o in outs if o.endswith(".h")],
        includes = ["."],
        alwayslink = alwayslink,
        testonly = testonly,
        deps = deps + ["@blockmeta//third_party:protobuf"] + (["@blockmeta//third_party:grpcpp"] if grpc else []),
        visibility = visibility,
    )
