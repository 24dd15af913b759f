"""Python stubs generated from proto/pose/v1/pose.proto. Never edit them by hand.

Regenerate from the repository root after changing the proto (tests/test_proto.py fails while the
committed stubs are stale)::

    python -m grpc_tools.protoc -Iservice/pb=proto --python_out=. --pyi_out=. \
        --grpc_python_out=. proto/pose/v1/pose.proto

The ``-Iservice/pb=proto`` mapping makes protoc see the file as ``service/pb/pose/v1/pose.proto``, so
the generated modules import each other as ``service.pb.pose.v1`` with no ``sys.path`` changes and no
rewriting of protoc's output. The protobuf package stays ``pose.v1``; only the file name that
reflection reports carries the ``service/pb/`` prefix.
"""
