"""A real GCS JSON API server on 127.0.0.1 (gcp-storage-emulator) for gs:// tests.

`start()` runs the emulator in a subprocess with one bucket and returns it with the environment
that points every client at it: gcsfs (STORAGE_EMULATOR_HOST), TensorStore, which writes
orbax's arrays (TENSORSTORE_GCS_HTTP_URL, a fixed test token), and gcsfs without the
storage-layout lookups of real GCS (the emulator has no control plane).

Run as a script, this file is the server: the emulator with object downloads that carry
`x-goog-generation`, as GCS's do (TensorStore reads an object's generation from that header
and refuses a download without it).
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
  from gcp_storage_emulator import __main__ as emulator_main  # pylint: disable=g-import-not-at-top
  emulator_main.main(argv)


if __name__ == "__main__":
  _serve(sys.argv[1:])
