"""Checkpoints on object storage: ``s3://`` (or any fsspec) URLs wherever shardwise takes a path.

- :mod:`.urls`: telling a URL from a local path, and the fsspec filesystem behind it;
- :mod:`.transfer`: one file down or up, streamed in parts (a file is never held whole in memory);
- :mod:`.mirror`: a remote input fetched to local scratch space for the length of a call, and a
  remote output written locally then published, its manifest last, so it is complete or absent;
- :mod:`.entry`: :func:`accepts_urls`, which gives every public function those two behaviours for
  the parameters it names.

Credentials and endpoints come from the environment as the filesystem's library reads them
(for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, profiles), or
from fsspec's configuration (``FSSPEC_S3_ENDPOINT_URL=...``, ``FSSPEC_S3='{"anon": true}'``).
S3 needs the ``s3`` extra (``pip install shardwise[s3]``, which brings ``s3fs``).
"""

from .entry import accepts_urls
from .urls import is_url

__all__ = ["accepts_urls", "is_url"]
