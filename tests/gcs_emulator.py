"""A real GCS JSON API server on 127.0.0.1 (gcp-storage-emulator) for gs:// tests.

`start()` runs the emulator in a subprocess with one bucket and returns it with the environment
that points every client at it: gcsfs (STORAGE_EMULATOR_HOST), TensorStore, which writes
orbax's arrays (TENSORSTORE_GCS_HTTP_URL, a fixed test token), and gcsfs without the
storage-layout lookups of real GCS (the emulator has no control plane).

Run as a script, this file is the server: the emulator with two behaviours of GCS it lacks.
Object downloads carry `x-goog-generation` (TensorStore reads an object's generation from that
header and refuses a download without it), and uploads honour the `ifGenerationMatch`
precondition with 412 as GCS does: `0` only if no live object has the name (write-if-absent),
any other number only if it is the live object's generation (compare-and-swap,
`files.write_if_version`). The emulator serves one request at a time, so the check and the
write it guards are one step, as on GCS.
"""
import dataclasses
import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Dict

BUCKET = "teacherlm-test"


@dataclasses.dataclass
class Emulator:
  process: subprocess.Popen
  env: Dict[str, str]
  bucket: str = BUCKET

  def uri(self, *parts: str) -> str:
    return "/".join([f"gs://{self.bucket}", *parts])

  def stop(self) -> None:
    self.process.terminate()
    try:
      self.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(timeout_s: float = 60) -> Emulator:
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  process = subprocess.Popen(
      [sys.executable, __file__, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory",
       f"--default-bucket={BUCKET}", "--quiet"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
         "EPATH_USE_TF": "false", "NO_GCE_CHECK": "true"}
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=2).read()
      return Emulator(process, env)
    except OSError:
      if process.poll() is not None or time.monotonic() > deadline:
        process.kill()
        raise RuntimeError(f"gcp-storage-emulator did not start on {url}")
      time.sleep(0.2)


def _with_generation_precondition(handler):
  """`handler` (an upload) answering 412 when `ifGenerationMatch` names another generation than
  the live object's (0: none may exist), as GCS does; resumable uploads carry it in their
  session URL, so every part is checked."""
  from http import HTTPStatus  # pylint: disable=g-import-not-at-top

  def checked(request, response, storage, *args, **kwargs):
    expected = request.query.get("ifGenerationMatch")
    if expected is not None:
      bucket = request.params["bucket_name"]
      if "upload_id" in request.query:
        name = storage.get_resumable_file_obj(request.query["upload_id"][0])["name"]
      elif "name" in request.query:
        name = request.query["name"][0]
      else:  # A multipart upload names its object in the metadata part.
        name = request.data["meta"].get("name")
      try:
        live = str(storage.get_file_obj(bucket, name)["generation"])
      except Exception:  # pylint: disable=broad-except  (no live object)
        live = "0"
      if live != expected[0]:
        response.status = HTTPStatus.PRECONDITION_FAILED
        response.json({"error": {"code": 412, "message": "Precondition Failed"}})
        return None
    return handler(request, response, storage, *args, **kwargs)

  return checked


def _serve(argv) -> None:
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # pylint: disable=broad-except  (not found: the 404 stands)
      return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", 1))

  objects.download = download_with_generation  # Before the server module builds its routes.
  objects.insert = _with_generation_precondition(objects.insert)
  objects.upload_partial = _with_generation_precondition(objects.upload_partial)
  from gcp_storage_emulator import __main__ as emulator_main  # pylint: disable=g-import-not-at-top
  emulator_main.main(argv)


if __name__ == "__main__":
  _serve(sys.argv[1:])
