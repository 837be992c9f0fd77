"""The policy served over gRPC (``policy_service.proto``): the wire format of tensors
(:mod:`~paradiffpolicy.remote.wire`), the batching server (:mod:`~paradiffpolicy.remote.server`, run by
``python -m paradiffpolicy.serve``) and its client (:mod:`~paradiffpolicy.remote.client`).

Nothing is pickled: tensors travel as dtype, shape and little-endian bytes, checked against the
policy's features before use.
"""
