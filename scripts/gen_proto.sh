#!/usr/bin/env bash
# Regenerate paradiffpolicy/remote/policy_service_pb2{,_grpc}.py from the .proto (needs grpcio-tools,
# which the `test` extra installs; tests/test_serve.py checks the committed modules are current).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. paradiffpolicy/remote/policy_service.proto
