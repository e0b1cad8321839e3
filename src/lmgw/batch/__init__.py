"""OpenAI's Files and Batch APIs, run by the gateway on its own fleet.

vLLM serves no Batch API over HTTP (it has an offline ``run-batch`` command); clients written
for OpenAI's (``client.files.create`` + ``client.batches.create``) need one in front of the
fleet. Here: :mod:`.files` keeps the uploaded and produced files (in memory, bounded),
:mod:`.jobs` checks a batch's input and runs its requests through the gateway's own handlers
at a low admission priority, and ``lmgw.api.batches`` serves the routes.
"""

from .files import FileStore, StoredFile
from .jobs import BatchJob, BatchService, parse_input

__all__ = ["BatchJob", "BatchService", "FileStore", "StoredFile", "parse_input"]
