"""A real S3-compatible server for tests and benchmarks: moto's server mode on loopback, in
its own process, its request log kept to count what the code under test asked of it."""

from __future__ import annotations

from pathlib import Path


class S3Server:
    """A real S3-compatible server (moto's server mode) on loopback, in its own process; its
    request log counts what the code under test asked of it."""

    def __init__(self, root: Path):
        import socket
        import subprocess
        import sys
        import time
        import urllib.request

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log = root / "s3-requests.log"
        moto = Path(sys.executable).with_name("moto_server")
        self.proc = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(port)],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    log = self.log.read_text()
                    raise RuntimeError(f"moto_server did not start: {log}") from None
                time.sleep(0.2)
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "headstart-test",
            "AWS_SECRET_ACCESS_KEY": "headstart-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **_keys(self.env))

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def upload(self, folder: Path, bucket: str, prefix: str) -> list[str]:
        """Every file under `folder` as an object under `prefix`, keys as relative paths."""
        s3 = self.client()
        urls = []
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = f"{prefix}/{f.relative_to(folder).as_posix()}"
            s3.put_object(Bucket=bucket, Key=key, Body=f.read_bytes())
            urls.append(f"s3://{bucket}/{key}")
        return urls

    def gets(self, bucket: str) -> int:
        """How many object bodies of `bucket` were read so far (GET of a key; listings are
        GETs of the bucket with a query, not counted)."""
        lines = self.log.read_text(errors="replace").splitlines()
        return sum(1 for line in lines if f'"GET /{bucket}/' in line and "list-type" not in line)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _keys(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }
