"""gcp-storage-emulator, plus the download headers real Cloud Storage sends and it omits.

  python tests/gcs_emulator.py start --port=P --in-memory --default-bucket=B

tensorstore (Orbax's array store) reads an object's generation from `x-goog-generation` on
every media download; without it, it fails with "Malformed StorageGeneration".
"""
import sys

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])
  except NotFound:
    pass  # the real handler answers 404
  return _download(request, response, storage, *args, **kwargs)


objects.download = download  # before the server module builds its routing table

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
