"""A Kubernetes API double: an in-process HTTP server that behaves as the API server
does for what canaryd uses (resourceVersion conflicts, the status subresource, watches,
``Status`` error bodies, finalizers), driven through the real ``kubernetes`` client.

It serves the tests and the playground (``canaryd playground``).  It is no part of the
controller: nothing in ``canaryd/`` but the playground imports it
(``tests/test_layers.py``).
"""

from kubedouble.apiserver import KubeApiServer, RequestRecord, WriteRecord

__all__ = ["KubeApiServer", "RequestRecord", "WriteRecord"]
