"""The sharded downloader against the real local S3 server (moto only for keys SeaweedFS refuses)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
from PIL import Image

from tagflow import s3
from tagflow.download import INDEX_NAME, JOURNAL_DIR, LOCK_NAME, TMP_PREFIX, DownloadFailed, download
from tagflow.errors import InputError, TooManyFailures
from tagflow.local import s3server
from tagflow.paths import local_path, local_relpath


def jpeg(seed: int, side: int = 16) -> bytes:
    """A small, valid JPEG whose bytes differ with `seed`."""
    image = Image.new("RGB", (side, side), ((seed * 37) % 256, (seed * 91) % 256, seed % 256))
    image.putpixel((seed % side, (seed // side) % side), (255 - seed % 256, 0, 0))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def put_all(client, bucket: str, objects: dict[str, bytes]) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), objects.items()))


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def image_files(dest: Path) -> set[str]:
    """Files in `dest` other than the downloader's own index and lock."""
    return files_under(dest) - {INDEX_NAME, LOCK_NAME}


def test_downloads_every_object_whole(s3_client, bucket, tmp_path):
    objects = {f"img/{d}/{n}.jpg": jpeg(10 * d + n) for d in range(3) for n in range(10)}
    put_all(s3_client, bucket, objects)
    other = f"{bucket}-other"
    s3_client.create_bucket(Bucket=other)
    s3_client.put_object(Bucket=other, Key="elsewhere/x.jpg", Body=jpeg(99))
    paths = [("/" if n % 2 else "") + key.removeprefix("img/") for n, key in enumerate(objects)]
    paths.append(f"s3://{other}/elsewhere/x.jpg")  # outside the source prefix: found by HEAD
    calls: list[tuple[int, int, int]] = []

    report = download(
        paths,
        tmp_path / "dest",
        source=s3.S3Uri(bucket, "img"),
        workers=4,
        progress=lambda *args: calls.append(args),
        progress_every=7,
    )

    dest = tmp_path / "dest"
    for path, body in zip(paths, [*objects.values(), jpeg(99)], strict=True):
        assert local_path(dest, path).read_bytes() == body
    assert image_files(dest) == {str(local_relpath(p)) for p in paths}
    assert (report.fetched, report.already_present, report.errors) == (31, 0, [])
    assert report.bytes == sum(map(len, objects.values())) + len(jpeg(99))
    assert [c[0] for c in calls] == [7, 14, 21, 28, 31]
    assert calls[-1] == (31, 31, report.bytes)
    summary = json.loads(json.dumps(report.to_dict()))
    assert (summary["total"], summary["fetched"], summary["failed"]) == (31, 31, 0)


def test_bad_objects_are_recorded_and_skipped(s3_client, bucket, tmp_path):
    put_all(
        s3_client,
        bucket,
        {
            "src/good.jpg": jpeg(1),
            "src/empty.jpg": b"",
            "src/corrupt.jpg": b"this is not an image at all",
            "src/truncated-header.jpg": jpeg(2)[:3],
            "src/big.jpg": jpeg(3, side=64),
        },
    )
    paths = [
        "good.jpg",
        "missing.jpg",
        "empty.jpg",
        "corrupt.jpg",
        "truncated-header.jpg",
        "big.jpg",
        f"s3://{bucket}/outside/missing.jpg",
    ]
    limit = len(jpeg(1)) + 1

    report = download(paths, tmp_path, source=s3.S3Uri(bucket, "src/"), workers=3, max_bytes=limit, max_bad_fraction=1)

    assert report.fetched == 1
    assert image_files(tmp_path) == {"good.jpg"}
    reasons = {e.path: e.reason for e in report.errors}
    assert reasons == {
        "missing.jpg": "no such key in S3 (not in the listing of the source prefix)",
        "empty.jpg": "empty object (0 bytes)",
        "corrupt.jpg": "not a decodable image: no image format recognises its header",
        "truncated-header.jpg": "not a decodable image: no image format recognises its header",
        "big.jpg": f"{len(jpeg(3, side=64))} bytes is larger than the limit of {limit} bytes",
        f"s3://{bucket}/outside/missing.jpg": "no such key in S3 (404)",
    }
    assert [e.path for e in report.errors] == paths[1:]  # list order, whatever order they finished in
    assert report.errors[0].uri == f"s3://{bucket}/src/missing.jpg"


def test_too_many_failures_says_which_and_why(s3_client, bucket, tmp_path):
    put_all(s3_client, bucket, {f"p/{n}.jpg": jpeg(n) for n in range(12)})
    paths = [f"{n}.jpg" for n in range(12)] + ["gone-a.jpg", "gone-b.jpg", "gone-c.jpg"]
    source = s3.S3Uri(bucket, "p/")

    with pytest.raises(DownloadFailed) as caught:
        download(paths, tmp_path, source=source, workers=2, max_bad_fraction=0.1)

    assert isinstance(caught.value, TooManyFailures)
    assert str(caught.value).splitlines() == [
        "3 of 15 objects failed (20.00%), more than the allowed 10.00%:",
        *(f"  'gone-{c}.jpg': no such key in S3 (not in the listing of the source prefix)" for c in "abc"),
    ]
    # At exactly the threshold the run passes; what the failed run wrote is kept and not fetched again.
    report = download(paths, tmp_path, source=source, workers=2, max_bad_fraction=0.2)
    assert len(report.errors) == 3
    assert report.fetched + report.already_present == 12
    assert caught.value.report.fetched == report.already_present


def test_failure_message_lists_the_first_twenty(bucket, tmp_path):
    paths = [f"absent-{n:02}.jpg" for n in range(25)]

    with pytest.raises(DownloadFailed) as caught:
        download(paths, tmp_path, source=s3.S3Uri(bucket, "x/"), workers=1, max_bad_fraction=0.99)

    lines = str(caught.value).splitlines()
    assert lines[0] == "25 of 25 objects failed (100.00%), more than the allowed 99.00%:"
    assert lines[1:21] == [
        f"  'absent-{n:02}.jpg': no such key in S3 (not in the listing of the source prefix)" for n in range(20)
    ]
    assert lines[21:] == ["  ... and 5 more"]


def test_run_stops_once_failure_is_certain(s3_client, bucket, tmp_path):
    s3_client.put_object(Bucket=bucket, Key="only.jpg", Body=jpeg(0))
    paths = ["only.jpg", *(f"absent-{n:03}.jpg" for n in range(200))]

    with pytest.raises(DownloadFailed) as caught:
        download(paths, tmp_path, source=s3.S3Uri(bucket, ""), workers=2, max_bad_fraction=0.1)

    report = caught.value.report
    done = report.fetched + len(report.errors)
    assert report.stopped_early
    assert 21 <= len(report.errors) < 200
    assert str(caught.value).splitlines()[0] == (
        f"{len(report.errors)} of 201 objects failed ({len(report.errors) / 201:.2%}), more than the allowed "
        f"10.00%; stopped after {done} of 201 objects:"
    )


def test_resume_fetches_only_what_changed(s3_client, bucket, tmp_path):
    objects = {f"r/{n}.jpg": jpeg(n) for n in range(20)}
    put_all(s3_client, bucket, objects)
    paths = [key.removeprefix("r/") for key in objects]
    source = s3.S3Uri(bucket, "r/")
    dest = tmp_path / "dest"

    first = download(paths, dest, source=source, workers=4)
    second = download(paths, dest, source=source, workers=4)
    assert (first.fetched, first.already_present) == (20, 0)
    assert (second.fetched, second.already_present, second.bytes) == (0, 20, 0)

    s3_client.put_object(Bucket=bucket, Key="r/3.jpg", Body=jpeg(1003))  # new ETag upstream
    (dest / "7.jpg").unlink()  # lost locally
    (dest / "9.jpg").write_bytes(b"x" * len(objects["r/9.jpg"]))  # same size, rewritten locally
    third = download(paths, dest, source=source, workers=4)

    assert (third.fetched, third.already_present) == (3, 17)
    assert (dest / "3.jpg").read_bytes() == jpeg(1003)
    assert (dest / "7.jpg").read_bytes() == objects["r/7.jpg"]
    assert (dest / "9.jpg").read_bytes() == objects["r/9.jpg"]
    index = json.loads((dest / INDEX_NAME).read_text())["objects"]
    assert sorted(index) == sorted(paths)


def test_known_sizes_are_used_instead_of_listing(s3_client, bucket, tmp_path):
    put_all(s3_client, bucket, {"k/a.jpg": jpeg(1), "k/b.jpg": jpeg(2)})
    etag = s3.list_objects(s3_client, s3.S3Uri(bucket, "k/a.jpg"))["k/a.jpg"][1]
    # The caller's (stale) size for b says it is too large, so it is skipped without being fetched.
    known = {"a.jpg": (len(jpeg(1)), etag), "b.jpg": (10**9, "whatever")}

    report = download(["a.jpg", "b.jpg"], tmp_path, source=s3.S3Uri(bucket, "k/"), known=known, max_bad_fraction=1)

    assert report.fetched == 1
    assert [(e.path, e.reason) for e in report.errors] == [
        ("b.jpg", f"1000000000 bytes is larger than the limit of {50 * 1024 * 1024} bytes")
    ]


def test_relative_paths_need_a_source(tmp_path):
    with pytest.raises(InputError, match=r"'a\.jpg' is relative but no source prefix was given"):
        download(["s3://b/x.jpg", "a.jpg"], tmp_path)


def test_unusable_and_clashing_list_paths_are_recorded(s3_client, bucket, tmp_path):
    s3_client.put_object(Bucket=bucket, Key=f"{bucket}/x.jpg", Body=jpeg(1))
    s3_client.put_object(Bucket=bucket, Key="x.jpg", Body=jpeg(2))
    long_name = "n" * 300 + ".jpg"
    paths = [f"{bucket}/x.jpg", f"s3://{bucket}/x.jpg", "/x.jpg", "x.jpg", long_name]

    report = download(paths, tmp_path, source=s3.S3Uri(bucket, ""), max_bad_fraction=1)

    assert report.total == 4  # "/x.jpg" and "x.jpg" are one file
    assert report.fetched == 2
    errors = report.to_dict()["errors"]
    assert errors[0] == {
        "path": f"s3://{bucket}/x.jpg",
        "uri": f"s3://{bucket}/x.jpg",
        "reason": f"would be stored at '{bucket}/x.jpg', which list path '{bucket}/x.jpg' "
        f"('s3://{bucket}/{bucket}/x.jpg') already uses",
    }
    assert (errors[1]["path"], errors[1]["uri"]) == (long_name, "")
    assert "longer than 255 bytes" in errors[1]["reason"]


def test_symlink_inside_dest_cannot_lead_outside(s3_client, bucket, tmp_path):
    put_all(s3_client, bucket, {"link/x.jpg": jpeg(1), "ok.jpg": jpeg(2)})
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "link").symlink_to(outside)

    report = download(["link/x.jpg", "ok.jpg"], dest, source=s3.S3Uri(bucket, ""), max_bad_fraction=1)

    assert report.fetched == 1
    assert [e.path for e in report.errors] == ["link/x.jpg"]
    assert "would be stored outside" in report.errors[0].reason
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("order", [["a/b.jpg", "a"], ["a", "a/b.jpg"]])
def test_a_key_and_a_folder_of_the_same_name_clash_cleanly(s3_client, bucket, tmp_path, order):
    put_all(s3_client, bucket, {"a": jpeg(1), "a/b.jpg": jpeg(2)})

    report = download(order, tmp_path, source=s3.S3Uri(bucket, ""), workers=1, max_bad_fraction=1)

    reason = {
        "a": "cannot write 'a': a folder of that name holds other objects",
        "a/b.jpg": "cannot write 'a/b.jpg': a file stands where a folder of its path should be",
    }[order[1]]
    assert [(e.path, e.reason) for e in report.errors] == [(order[1], reason)]
    assert local_path(tmp_path, order[0]).read_bytes() == jpeg(1 if order[0] == "a" else 2)
    assert not any(name.startswith(TMP_PREFIX) for name in files_under(tmp_path))


@pytest.fixture
def moto_client():
    """An S3 client on moto's server: the only S3 here that accepts keys with `..` segments."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        session = boto3.session.Session(aws_access_key_id="moto", aws_secret_access_key="moto", region_name="us-east-1")
        yield s3.make_client(f"http://{host}:{port}", session=session)
    finally:
        server.stop()


ESCAPING_KEYS = [
    "../x.jpg",
    "a/../../b.jpg",
    "../..",
    "./.",
    "a/./../c.jpg",
    "ctl\x01\x1f\x7f.jpg",
    "%.jpg",
    "%2E%2E/y.jpg",
    "d//e.jpg",
]


def test_path_escape_attempts_stay_inside_dest(moto_client, tmp_path):
    moto_client.create_bucket(Bucket="escape")
    objects = {key: jpeg(n) for n, key in enumerate(ESCAPING_KEYS)}
    objects["/abs.jpg"] = jpeg(50)
    put_all(moto_client, "escape", objects)
    paths = [*ESCAPING_KEYS, "s3://escape//abs.jpg"]  # a key with a leading slash needs the full URI
    dest = tmp_path / "a" / "dest"

    report = download(paths, dest, source=s3.S3Uri("escape", ""), client=moto_client, workers=4)

    assert (report.fetched, report.errors) == (len(paths), [])
    assert files_under(tmp_path) == {f"a/dest/{name}" for name in (INDEX_NAME, LOCK_NAME)} | {
        f"a/dest/{local_relpath(p)}" for p in paths
    }
    for path, body in zip(paths, objects.values(), strict=True):
        assert local_path(dest, path).read_bytes() == body
    assert (dest / "%2E%2E" / "x.jpg").exists()
    assert (dest / "escape" / "%" / "abs.jpg").exists()


@pytest.mark.slow
def test_server_killed_mid_run_then_restarted(tmp_path):
    state = tmp_path / "srv"
    info = s3server.start(state)
    try:
        objects = {f"kill/{n:03}.jpg": jpeg(n, side=24) for n in range(300)}
        client = _client(info)
        client.create_bucket(Bucket="killed")
        put_all(client, "killed", objects)
        paths = [key.removeprefix("kill/") for key in objects]
        source, dest = s3.S3Uri("killed", "kill/"), tmp_path / "dest"
        reached, stopped = threading.Event(), threading.Event()
        outcome: dict[str, object] = {}

        def hold_at_first_progress(done: int, total: int, nbytes: int) -> None:
            if not reached.is_set():
                reached.set()
                stopped.wait(60)  # the server is killed while this run still has 200+ objects to go

        def first_run() -> None:
            try:
                outcome["report"] = download(
                    paths, dest, source=source, client=_client(info, attempts=3), workers=8,
                    progress=hold_at_first_progress, progress_every=100,
                )  # fmt: skip
            except DownloadFailed as err:
                outcome["report"] = err.report

        runner = threading.Thread(target=first_run)
        runner.start()
        assert reached.wait(60)
        s3server.stop(state)
        stopped.set()
        info = s3server.start(state)  # same data; the same ports when they are free
        runner.join(120)
        assert not runner.is_alive()

        first = outcome["report"]
        assert 100 <= first.fetched + len(first.errors) <= 300
        second = download(paths, dest, source=source, client=_client(info), workers=8)

        assert second.errors == []
        assert second.already_present == first.fetched
        assert second.fetched == 300 - first.fetched
        assert image_files(dest) == set(paths)  # one file per object, no temporary left
        assert not any(name.startswith(TMP_PREFIX) for name in files_under(dest))
        for path in paths:
            assert (dest / path).read_bytes() == objects[f"kill/{path}"]
    finally:
        s3server.stop(state)


def _client(info: s3server.ServerInfo, attempts: int = 5):
    session = boto3.session.Session(
        aws_access_key_id=info.access_key, aws_secret_access_key=info.secret_key, region_name=info.region
    )
    return s3.make_client(info.endpoint, session=session, max_attempts=attempts, connect_timeout=1, read_timeout=5)


# --- a killed run resumes; the destination folder's faults are one message -----------------------------------

DOWNLOAD_IN_CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from tagflow import s3
    from tagflow.download import download

    bucket, prefix, dest, paths = json.loads(sys.stdin.read())
    report = download(paths, Path(dest), source=s3.S3Uri(bucket, prefix), workers=8)
    print(json.dumps(report.to_dict()))
    """
)


def landed(dest: Path) -> set[str]:
    """Image files in place (not the downloader's own `%` files)."""
    return {name for name in files_under(dest) if not any(part.startswith("%") for part in Path(name).parts)}


def test_sigkill_mid_run_resumes_where_it_stopped(s3_client, bucket, tmp_path):
    objects = {f"many/{n // 500}/{n:04}.jpg": jpeg(n, side=8) for n in range(3000)}
    put_all(s3_client, bucket, objects)
    paths = [key.removeprefix("many/") for key in objects]
    dest = tmp_path / "dest"
    child = subprocess.Popen(
        [sys.executable, "-c", DOWNLOAD_IN_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    child.stdin.write(json.dumps([bucket, "many/", str(dest), paths]))
    child.stdin.close()
    deadline = time.monotonic() + 120
    while len(landed(dest) if dest.exists() else ()) < 600:  # poll the destination
        assert child.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    on_disk = landed(dest)
    assert 600 <= len(on_disk) < 3000
    assert not (dest / INDEX_NAME).exists()  # the index is written at the end: only the journal knows

    again = download(paths, dest, source=s3.S3Uri(bucket, "many/"), workers=8)

    # Every file the killed run had renamed into place and journaled is kept: at most one per worker can land
    # between its rename and its journal line.
    assert len(on_disk) - 8 <= again.already_present <= len(on_disk)
    assert again.fetched == 3000 - again.already_present and again.errors == []
    assert landed(dest) == set(paths)
    for path in paths:
        assert (dest / path).read_bytes() == objects[f"many/{path}"]
    assert not any(Path(name).name.startswith(TMP_PREFIX) for name in files_under(dest))
    assert not (dest / JOURNAL_DIR).exists()  # folded into the index and removed
    third = download(paths, dest, source=s3.S3Uri(bucket, "many/"), workers=8)
    assert (third.fetched, third.already_present) == (0, 3000)


def test_dead_run_leftovers_are_folded_in_and_cleaned(s3_client, bucket, tmp_path):
    """The state a SIGKILL leaves mid-write, made exactly: a journal nobody holds, a temporary in `sub/`."""
    objects = {"j/sub/a.jpg": jpeg(1), "j/sub/b.jpg": jpeg(2), "j/c.jpg": jpeg(3)}
    put_all(s3_client, bucket, objects)
    paths = ["sub/a.jpg", "sub/b.jpg", "c.jpg"]
    source, dest = s3.S3Uri(bucket, "j/"), tmp_path / "dest"
    first = download(paths[:1], dest, source=source)
    assert first.fetched == 1
    entry = json.loads((dest / INDEX_NAME).read_text())["objects"]["sub/a.jpg"]
    (dest / INDEX_NAME).unlink()  # as if the run had been killed before writing the index
    (dest / JOURNAL_DIR).mkdir()
    token = "0123456789ab"
    (dest / JOURNAL_DIR / f"{token}.jsonl").write_bytes(
        b'["t","sub"]\n' + json.dumps(["f", "sub/a.jpg", *entry]).encode() + b'\n["f","sub/b.jpg",12'  # torn
    )
    (dest / "sub" / f"{TMP_PREFIX}{token}-7").write_bytes(b"half an ima")
    (dest / "sub" / f"{TMP_PREFIX}ffffffffffff-1").write_bytes(b"not that run's")  # another run's: left alone

    again = download(paths, dest, source=source)

    assert (again.fetched, again.already_present) == (2, 1)
    assert sorted(n for n in files_under(dest / "sub") if n.startswith(TMP_PREFIX)) == [f"{TMP_PREFIX}ffffffffffff-1"]
    assert not (dest / JOURNAL_DIR).exists()
    assert sorted(json.loads((dest / INDEX_NAME).read_text())["objects"]) == sorted(paths)


def test_a_live_runs_journal_is_used_but_left_alone(s3_client, bucket, tmp_path):
    import fcntl

    put_all(s3_client, bucket, {"l/a.jpg": jpeg(1), "l/b.jpg": jpeg(2)})
    source, dest = s3.S3Uri(bucket, "l/"), tmp_path / "dest"
    download(["a.jpg"], dest, source=source)
    entry = json.loads((dest / INDEX_NAME).read_text())["objects"]["a.jpg"]
    (dest / INDEX_NAME).unlink()
    (dest / JOURNAL_DIR).mkdir()
    journal = dest / JOURNAL_DIR / "aaaaaaaaaaaa.jsonl"
    journal.write_text(json.dumps(["f", "a.jpg", *entry]) + "\n")
    with open(journal, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a run still going
        report = download(["a.jpg", "b.jpg"], dest, source=source)
        assert (report.fetched, report.already_present) == (1, 1)
        assert journal.exists()


def test_dest_that_is_a_file_is_one_message(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError) as caught:
        download(["s3://b/x.jpg"], afile)
    assert str(caught.value) == (
        f"download destination {str(afile)!r} exists but is not a folder: expected a folder, or a name to create one"
    )
    with pytest.raises(InputError) as caught:
        download(["s3://b/x.jpg"], afile / "sub" / "dest")
    assert str(caught.value) == (
        f"cannot create download destination {str(afile / 'sub' / 'dest')!r}: {str(afile)!r} is a file; "
        "expected folders along its path"
    )


def in_small_fs(tmp_path: Path, code: str, *, size: str = "256k", read_only: bool = False) -> dict:
    """Run Python `code` where `tmp_path/fs` is a fresh tmpfs of `size` (read-only if asked), in a private mount
    namespace (`unshare`, no root needed): a real full disk or read-only file system. Returns the JSON it prints."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], check=False).returncode:
        pytest.skip("needs unshare with user and mount namespaces to make a small file system")
    mnt = tmp_path / "fs"
    mnt.mkdir(parents=True)
    options = f"size={size}" + (",ro" if read_only else "")
    shell = f'mount -t tmpfs -o {options} tagflow-test "$0" && exec "$1" -c "$2"'
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", shell, str(mnt), sys.executable, code],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "FS": str(mnt)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


CATCH = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from tagflow import s3
    from tagflow.errors import TagflowError
    fs = Path(os.environ["FS"])

    def listing(folder):
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []

    def attempt(fn):
        try:
            fn()
            return None
        except TagflowError as err:  # InputError (exit 2): the path given is wrong; else (exit 1) the machine failed
            return f"{type(err).__name__}: {err}"
    """
)


def test_read_only_and_full_destinations_are_one_message(s3_client, bucket, tmp_path):
    put_all(s3_client, bucket, {f"f/{n:03}.jpg": jpeg(n, side=64) for n in range(300)})
    code = CATCH + textwrap.dedent(
        f"""
        from tagflow.download import download
        paths = [f"{{n:03}}.jpg" for n in range(300)]
        source = s3.S3Uri({bucket!r}, "f/")
        out = {{"ro_root": attempt(lambda: download(paths, fs, source=source)),
                "ro_sub": attempt(lambda: download(paths, fs / "d", source=source))}}
        print(json.dumps(out))
        """
    )
    read_only = in_small_fs(tmp_path / "ro", code, read_only=True)
    ro = str(tmp_path / "ro" / "fs")
    assert read_only == {
        "ro_root": f"InputError: download destination {ro!r} is not writable: the file system is read-only",
        "ro_sub": f"InputError: cannot create download destination {ro + '/d'!r}: the file system is read-only",
    }

    code = CATCH + textwrap.dedent(
        f"""
        from tagflow.download import download
        paths = [f"{{n:03}}.jpg" for n in range(300)]
        out = {{"full": attempt(lambda: download(paths, fs / "d", source=s3.S3Uri({bucket!r}, "f/"), workers=4)),
                "left": listing(fs / "d")}}
        print(json.dumps(out))
        """
    )
    full = in_small_fs(tmp_path / "full", code, size="64k")
    assert full["full"] is not None, "the download should have run out of space"
    dest = str(tmp_path / "full" / "fs" / "d")
    assert full["full"].startswith(f"TagflowError: cannot write '{dest}/")
    assert full["full"].endswith("': no space left on the device (disk full)")
    assert not [name for name in full["left"] if Path(name).name.startswith(TMP_PREFIX)]


def test_messages_cut_a_huge_path(bucket, tmp_path):
    huge = "a/" * 5_000_000 + "x.jpg"  # 10 MB
    with pytest.raises(InputError) as caught:
        download([huge], tmp_path)
    assert len(str(caught.value)) < 500 and "(10000005 characters)" in str(caught.value)
    with pytest.raises(DownloadFailed) as failed:
        download([huge, "b.jpg"], tmp_path, source=s3.S3Uri(bucket, ""), max_bad_fraction=0)
    assert len(str(failed.value)) < 2000
    assert failed.value.report.errors[0].path == huge  # the report keeps the whole value; messages cut it
