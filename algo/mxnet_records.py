"""Read and write RecordIO with MXNet's own code, for tests and benchmarks; prints JSON on stdout.

Runs only in the algorithm environment (`.venv-mxnet/bin/python algo/mxnet_records.py ...`), never imported by
tagflow. Subcommands:

  indexed REC IDX          every record through MXIndexedRecordIO.read_idx + recordio.unpack_img:
                           {"records": [{"key", "flag", "label", "id", "id2", "labels", "shape", "sha256"}]}
  iter REC --label-width N --data-shape C,H,W --batch-size B
                           ImageRecordIter in file order (the last batch wraps round; `pad` counts the extra):
                           {"batches": [{"labels": [[...]], "pad", "shape", "mean"}]}
  write REC IDX            read {"records": [[key, payload_base64], ...]} on stdin and write them with
                           MXIndexedRecordIO.write_idx (MXNet's RecordIO writer): {"written": n}
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys


def cmd_indexed(args: argparse.Namespace) -> dict:
    import mxnet as mx

    reader = mx.recordio.MXIndexedRecordIO(args.idx, args.rec, "r")
    records = []
    try:
        for key in reader.keys:
            payload = reader.read_idx(key)
            header, image = mx.recordio.unpack_img(payload, iscolor=1)
            label = header.label
            records.append(
                {
                    "key": int(key),
                    "flag": int(header.flag),
                    "id": int(header.id),
                    "id2": int(header.id2),
                    "labels": [float(v) for v in label] if header.flag > 0 else [float(label)],
                    "shape": list(image.shape) if image is not None else None,
                    "sha256": hashlib.sha256(payload).hexdigest(),
                }
            )
    finally:
        reader.close()
    return {"records": records}


def cmd_iter(args: argparse.Namespace) -> dict:
    import mxnet as mx

    shape = tuple(int(v) for v in args.data_shape.split(","))
    it = mx.io.ImageRecordIter(
        path_imgrec=args.rec,
        data_shape=shape,
        label_width=args.label_width,
        batch_size=args.batch_size,
        shuffle=False,
        preprocess_threads=1,
    )
    batches = []
    for batch in it:
        labels = batch.label[0].asnumpy()
        data = batch.data[0].asnumpy()
        batches.append(
            {
                "labels": labels.reshape(labels.shape[0], -1).tolist(),
                "pad": int(batch.pad),
                "shape": list(data.shape),
                "mean": float(data.mean()),
            }
        )
    return {"batches": batches}


def cmd_write(args: argparse.Namespace) -> dict:
    import mxnet as mx

    request = json.load(sys.stdin)
    writer = mx.recordio.MXIndexedRecordIO(args.idx, args.rec, "w")
    try:
        for key, encoded in request["records"]:
            writer.write_idx(int(key), base64.b64decode(encoded))
    finally:
        writer.close()
    return {"written": len(request["records"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    indexed = sub.add_parser("indexed")
    indexed.add_argument("rec")
    indexed.add_argument("idx")
    itr = sub.add_parser("iter")
    itr.add_argument("rec")
    itr.add_argument("--label-width", type=int, required=True)
    itr.add_argument("--data-shape", default="3,96,96")
    itr.add_argument("--batch-size", type=int, default=16)
    write = sub.add_parser("write")
    write.add_argument("rec")
    write.add_argument("idx")
    args = parser.parse_args()
    result = {"indexed": cmd_indexed, "iter": cmd_iter, "write": cmd_write}[args.command](args)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
