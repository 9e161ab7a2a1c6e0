"""A real S3 HTTP endpoint on 127.0.0.1 (moto's standalone server) for demos and tests.

  python infra/local_s3.py --bucket demo -- python jobs/distill.py ...

starts the server on a free loopback port, creates the buckets, runs the command with
AWS_ENDPOINT_URL (and dummy credentials, when none are set) in its environment, then stops.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(buckets=(), port: int = 0):
    """Starts the server in this process; returns (server, endpoint URL). Sets the env vars."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = port or free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    # moto accepts any credentials; real ones from the environment are left untouched.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    for b in buckets:
        s3.create_bucket(Bucket=b)
    return server, endpoint


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- command to run")
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give a command after --")
    server, endpoint = start(args.bucket, args.port)
    print(f"local S3 endpoint: {endpoint} (buckets: {', '.join(args.bucket) or 'none'})",
          flush=True)
    try:
        return subprocess.call(cmd)
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
