"""The object-store client, head to head: boto3 (what digitflow used) vs obstore (what it uses),
the same operations on the same endpoint, in one run.

    python benchmarks/bench_store.py [--json] [--mib 64] [--small 200] [--repeats 3]

Operations, each timed ``--repeats`` times (the median is printed): upload and download of one
``--mib`` MiB file in 8 MiB parts, 4 at a time (boto3's TransferConfig as digitflow configured
it; ``ObjectStore.upload``/``download``); ``--small`` create-only PUTs of 4 KiB (``If-None-Match:
*``), as many HEADs, one listing of them. The endpoint is moto_server on 127.0.0.1 (or
$DIGITFLOW_TEST_S3_ENDPOINT); obstore is also timed against Azurite when ``azurite-blob`` is
installed. A local emulator measures client overhead, not a cloud's bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from tests.store_helpers import azurite_endpoint, boto3_client, s3_endpoint, unique_prefix  # noqa: E402

PART, THREADS = 8 << 20, 4


def timed(fn, repeats: int) -> float:
    runs = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        runs.append(time.perf_counter() - t0)
    return round(statistics.median(runs), 4)


def bench_boto3(env: dict, bucket: str, big: Path, tmp: Path, small: int, repeats: int) -> dict:
    from boto3.s3.transfer import TransferConfig

    client = boto3_client(env)
    prefix = unique_prefix("boto3")
    config = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=THREADS)
    payload = os.urandom(4096)
    out = {
        "upload_s": timed(lambda i: client.upload_file(str(big), bucket, f"{prefix}/big{i}", Config=config,
                                                       ExtraArgs={"Metadata": {"sha256": "x"}}), repeats),
        "download_s": timed(lambda i: client.download_file(bucket, f"{prefix}/big{i}", str(tmp / f"b{i}"),
                                                           Config=config), repeats),
        "small_put_s": timed(lambda i: [client.put_object(Bucket=bucket, Key=f"{prefix}/s{i}/{k}", Body=payload,
                                                          IfNoneMatch="*") for k in range(small)], repeats),
        "head_s": timed(lambda i: [client.head_object(Bucket=bucket, Key=f"{prefix}/s{i}/{k}") for k in range(small)],
                        repeats),
        "list_s": timed(lambda i: [o for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix}/s{i}/") for o in page.get("Contents", [])], repeats),
    }
    assert (tmp / "b0").read_bytes() == big.read_bytes()
    return out


def bench_store(url: str, big: Path, tmp: Path, small: int, repeats: int) -> dict:
    from storage.objects import open_store

    store = open_store(url)
    payload = os.urandom(4096)
    out = {
        "upload_s": timed(lambda i: store.upload(f"big{i}", big, "x"), repeats),
        "download_s": timed(lambda i: store.download(f"big{i}", tmp / f"o{i}"), repeats),
        "small_put_s": timed(lambda i: [store.put(f"s{i}/{k}", payload, if_none_match=True) for k in range(small)],
                             repeats),
        "head_s": timed(lambda i: [store.head(f"s{i}/{k}") for k in range(small)], repeats),
        "list_s": timed(lambda i: store.list(f"s{i}"), repeats),
    }
    assert (tmp / "o0").read_bytes() == big.read_bytes()
    return out


def rates(r: dict, mib: int, small: int) -> dict:
    return {**r, "upload_MiB_s": round(mib / r["upload_s"], 1), "download_MiB_s": round(mib / r["download_s"], 1),
            "small_put_per_s": round(small / r["small_put_s"]), "head_per_s": round(small / r["head_s"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--small", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    results: dict = {"mib": args.mib, "small": args.small, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp, s3_endpoint(Path(tmp)) as (endpoint, bucket, env):
        tmp = Path(tmp)
        big = tmp / "big.bin"
        big.write_bytes(os.urandom(args.mib << 20))
        os.environ.update(env)
        results["s3 boto3"] = rates(bench_boto3(env, bucket, big, tmp, args.small, args.repeats), args.mib, args.small)
        results["s3 obstore"] = rates(bench_store(f"s3://{bucket}/{unique_prefix('obstore')}", big, tmp, args.small,
                                                  args.repeats), args.mib, args.small)
        try:
            with azurite_endpoint(tmp) as (_, container, az_env):
                os.environ.update(az_env)
                results["az obstore"] = rates(bench_store(f"az://{container}/{unique_prefix('obstore')}", big, tmp,
                                                          args.small, args.repeats), args.mib, args.small)
        except RuntimeError as e:
            results["az obstore"] = str(e)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for name, r in results.items():
        if isinstance(r, dict):
            print(f"{name:11} up {r['upload_MiB_s']:7.1f} MiB/s  down {r['download_MiB_s']:7.1f} MiB/s  "
                  f"create-only PUT {r['small_put_per_s']:5}/s  HEAD {r['head_per_s']:5}/s  list {r['list_s']:.3f} s")


if __name__ == "__main__":
    main()
