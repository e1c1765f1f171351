"""precompute on bad input: the cache lock, all-failed runs, options that do nothing, a CLIP
checkpoint of another config, a manifest that is not UTF-8, and Ray processes outliving a killed
driver. Each test drives the real command (or the function it calls) and checks what is left."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from samcp.cli.main import main as samcp_main
from samcp.pipeline import folderlock
from samcp.pipeline import precompute as pre
from samcp.pipeline.cache import CacheReader
from samcp.pipeline.clip import TEST_MODEL_CONFIGS, load_clip, make_random_clip_checkpoint
from samcp.pipeline.datasets import read_manifest
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.proposals import ProposalConfig
from samcp.pipeline.synth import make_synthetic_dataset

TEST_CLIP = "samcp-test-convnext"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    make_synthetic_dataset(root, seed=4, num_train=0, num_val=5, height=64, width=80)
    return root


def _run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one `samcp` call; 0 when it returns normally."""
    code = 0
    try:
        samcp_main(args)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _slic_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [
        "precompute",
        str(dataset),
        "--out",
        str(out),
        "--proposals",
        "slic",
        "--shard-size",
        "2",
        "--num-workers",
        "0",
        "--no-progress",
        *extra,
    ]


def _write_lock(folder: Path, **holder) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / folderlock.LOCK_FILE
    path.write_text(json.dumps({"started": "2026-01-02T03:04:05Z", **holder}))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- 1. the cache lock ---------------------------------------------------------------------------


def test_a_cache_locked_by_a_live_run_is_refused(dataset, tmp_path, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "c"
        lock = _write_lock(out, host=socket.gethostname(), pid=sleeper.pid)
        before = lock.read_bytes()
        code, _, err = _run_cli(_slic_args(dataset, out), capsys)
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1
        assert f"pid {sleeper.pid} on {socket.gethostname()}" in err
        assert "since 2026-01-02T03:04:05Z" in err and "another --out" in err
        # Nothing was created, and the holder's lock is untouched.
        assert sorted(p.name for p in out.iterdir()) == [folderlock.LOCK_FILE]
        assert lock.read_bytes() == before
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lock_from_another_host_is_respected_and_says_how_to_remove_it(dataset, tmp_path, capsys):
    out = tmp_path / "c"
    lock = _write_lock(out, host="some-other-host", pid=_dead_pid())
    code, _, err = _run_cli(_slic_args(dataset, out), capsys)
    assert code == 2 and "some-other-host" in err
    assert f"delete {lock}" in err
    assert lock.exists() and not (out / "zarr.json").exists()


def test_a_stale_lock_on_this_host_is_taken_over(dataset, tmp_path, capsys):
    out = tmp_path / "c"
    dead = _dead_pid()
    _write_lock(out, host=socket.gethostname(), pid=dead)
    code, stdout, err = _run_cli(_slic_args(dataset, out), capsys)
    assert code == 0, err
    assert "taking over the lock" in err and f"pid {dead}" in err
    assert "images: 5 processed now, 0 failed rows" in stdout
    assert len(CacheReader(out).shard_ids) == 3
    assert not (out / folderlock.LOCK_FILE).exists()


def test_a_reused_pid_does_not_keep_a_stale_lock(dataset, tmp_path):
    """The holder's pid now belongs to another process (started at another time): stale."""
    out = tmp_path / "c"
    _write_lock(out, host=socket.gethostname(), pid=os.getpid(), pid_start="other-boot:1")
    cfg = pre.PrecomputeConfig(
        source=str(dataset),
        out=str(out),
        proposals=ProposalConfig("slic"),
        num_workers=0,
        progress=False,
    )
    if folderlock._process_start(os.getpid()) is None:
        pytest.skip("process start times are not known on this OS")
    assert pre.run_precompute(cfg).num_images == 5


def test_the_lock_is_held_during_the_run_and_released_on_errors(dataset, tmp_path, monkeypatch):
    out = tmp_path / "c"
    seen = []
    real = pre.process_shard

    def spy(processor, cache, shard_id, records):
        seen.append(json.loads((Path(cache) / folderlock.LOCK_FILE).read_text()))
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(processor, cache, shard_id, records)

    monkeypatch.setattr(pre, "process_shard", spy)
    cfg = pre.PrecomputeConfig(
        source=str(dataset),
        out=str(out),
        shard_size=2,
        proposals=ProposalConfig("slic"),
        num_workers=0,
        progress=False,
    )
    with pytest.raises(KeyboardInterrupt):
        pre.run_precompute(cfg)
    assert [h["pid"] for h in seen] == [os.getpid()] * 2
    assert seen[0]["host"] == socket.gethostname() and seen[0]["token"]
    assert not (out / folderlock.LOCK_FILE).exists()
    # A second lock in this very process is refused while the first is held.
    with folderlock.FolderLock(out):
        with pytest.raises(SamcpError, match=f"pid {os.getpid()}"):
            folderlock.FolderLock(out).acquire()
    assert not (out / folderlock.LOCK_FILE).exists()


def test_taking_over_never_removes_a_lock_that_another_run_took_first(tmp_path):
    out = tmp_path / "c"
    stale = _write_lock(out, host=socket.gethostname(), pid=_dead_pid()).read_bytes()
    fresh = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "now"})
    (out / folderlock.LOCK_FILE).write_text(fresh)  # another run replaced the stale lock meanwhile
    assert folderlock.FolderLock(out)._take_over(stale) is False
    assert (out / folderlock.LOCK_FILE).read_text() == fresh
    assert sorted(p.name for p in out.iterdir()) == [folderlock.LOCK_FILE]


def test_a_lock_taken_for_a_new_folder_leaves_nothing_when_the_run_fails(tmp_path):
    out = tmp_path / "new" / "c"
    with pytest.raises(RuntimeError):
        with folderlock.FolderLock(out):
            assert (out / folderlock.LOCK_FILE).is_file()
            raise RuntimeError("the run failed before writing")
    assert not out.exists()


# --- 2. every image failed -----------------------------------------------------------------------


def _corrupt_copy(dataset: Path, dest: Path, how_many: int | None = None) -> Path:
    import shutil

    shutil.copytree(dataset, dest)
    images = sorted((dest / "val2017").iterdir())
    for img in images[:how_many]:
        img.write_bytes(b"not an image")
    return dest


def test_a_run_where_every_image_failed_exits_non_zero(dataset, tmp_path, capsys):
    data = _corrupt_copy(dataset, tmp_path / "data")
    code, stdout, err = _run_cli(_slic_args(data, tmp_path / "c"), capsys)
    assert code == 2
    assert err.startswith("error: all 5 images failed; fix the image files")
    assert "re-run with --redo-failed; first reasons: " in err and "UnidentifiedImageError" in err
    assert len(err.strip().splitlines()) == 1
    # The summary still says what was done, with the reasons per image.
    assert "failed: 5 of 5 images" in stdout
    assert (
        sum(line.startswith("  ") and "Unidentified" in line for line in stdout.splitlines()) == 5
    )
    assert not (tmp_path / "c" / folderlock.LOCK_FILE).exists()


def test_some_failed_images_are_counted_and_named(dataset, tmp_path, capsys):
    data = _corrupt_copy(dataset, tmp_path / "data", how_many=2)
    code, stdout, err = _run_cli(_slic_args(data, tmp_path / "c"), capsys)
    assert code == 0, err
    failed = [
        r.image_id
        for r in CacheReader(tmp_path / "c").iter_images(include_failed=True)
        if r.status == 1
    ]
    assert len(failed) == 2
    assert "failed: 2 of 5 images" in stdout
    for image_id in failed:
        assert any(line.startswith(f"  {image_id}: ") for line in stdout.splitlines())


def test_all_failed_is_an_error_for_the_python_api_too(dataset, tmp_path):
    data = _corrupt_copy(dataset, tmp_path / "data")
    cfg = pre.PrecomputeConfig(
        source=str(data),
        out=str(tmp_path / "c"),
        proposals=ProposalConfig("slic"),
        num_workers=0,
        progress=False,
    )
    with pytest.raises(pre.AllImagesFailed) as info:
        pre.run_precompute(cfg)
    assert info.value.summary.num_failed_images == 5 and len(info.value.summary.failed_reasons) == 5


# --- 4. options that do nothing for the chosen source ----------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sam-checkpoint", "x.pth"], "--sam-checkpoint is read only by --proposals sam"),
        (["--external", "amg/"], "--external is read only by --proposals external"),
        (["--clip-model", "ViT-B-32"], "--clip-model shapes CLIP features"),
        (["--clip-levels", "res4", "--no-clip-dense"], "--clip-levels, --no-clip-dense shape"),
        (["--ray-address", "auto"], "--ray-address joins a Ray cluster"),
    ],
)
def test_contradicting_options_are_refused(dataset, tmp_path, capsys, extra, message):
    code, _, err = _run_cli(_slic_args(dataset, tmp_path / "c", *extra), capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_external_proposals_with_a_sam_checkpoint_are_refused(dataset, tmp_path, capsys):
    args = _slic_args(dataset, tmp_path / "c", "--sam-checkpoint", "x.pth", "--external", "a/")
    args[args.index("slic")] = "external"
    code, _, err = _run_cli(args, capsys)
    assert code == 2 and "not --proposals external" in err


def test_tuning_for_another_source_is_warned_about(dataset, tmp_path, capsys):
    code, stdout, err = _run_cli(
        _slic_args(dataset, tmp_path / "c", "--points-per-side", "16", "--sam-model", "vit_b"),
        capsys,
    )
    assert code == 0
    assert "warning: --sam-model, --points-per-side do nothing with --proposals slic" in err
    assert "images: 5 processed now" in stdout
    # SLIC settings given to SAM: warned before anything else happens (here: no checkpoint).
    code, _, err = _run_cli(
        ["precompute", str(dataset), "--out", str(tmp_path / "d"), "--slic-segments", "50"],
        capsys,
    )
    assert code == 2
    assert err.splitlines()[0] == (
        "warning: --slic-segments does nothing with --proposals sam (ignored)"
    )


def test_defaults_and_matching_options_give_no_warning(dataset, tmp_path, capsys):
    code, _, err = _run_cli(
        _slic_args(dataset, tmp_path / "c", "--slic-segments", "20", "--limit", "2"), capsys
    )
    assert code == 0 and "warning" not in err


# --- 5. a CLIP checkpoint of another config --------------------------------------------------------


@pytest.fixture(scope="module")
def other_clip_checkpoint(tmp_path_factory) -> Path:
    """Weights of a second tiny open_clip config (wider text tower) under its own name."""
    import open_clip

    name = "samcp-test-convnext-wide-text"
    if name not in open_clip.list_models():
        cfg = json.loads(json.dumps(TEST_MODEL_CONFIGS[TEST_CLIP]))
        cfg["text_cfg"]["width"] = 96
        path = tmp_path_factory.mktemp("cfg") / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)
    return make_random_clip_checkpoint(tmp_path_factory.mktemp("clip") / "wide.pt", name)


def test_a_clip_checkpoint_of_another_config_names_clip_model(other_clip_checkpoint):
    with pytest.raises(SamcpError) as info:
        load_clip(TEST_CLIP, other_clip_checkpoint)
    msg = str(info.value)
    assert msg.startswith(f"CLIP checkpoint {other_clip_checkpoint} does not fit --clip-model")
    assert "size mismatches, e.g. " in msg and "96] in the file but [" in msg
    assert msg.endswith(
        "check --clip-model: it must name the open_clip config the weights were trained with"
    )


def test_a_clip_checkpoint_of_another_config_through_the_cli(
    dataset, tmp_path, capsys, other_clip_checkpoint
):
    code, _, err = _run_cli(
        _slic_args(
            dataset,
            tmp_path / "c",
            "--clip-checkpoint",
            str(other_clip_checkpoint),
            "--clip-model",
            TEST_CLIP,
        ),
        capsys,
    )
    assert code == 2 and f"does not fit --clip-model {TEST_CLIP}" in err
    assert "check --clip-model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_a_file_that_is_no_checkpoint_is_still_called_unreadable(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint" * 8)
    with pytest.raises(SamcpError, match="cannot read CLIP checkpoint"):
        load_clip(TEST_CLIP, bad)


# --- 6. manifests that are not UTF-8 or not manifests ----------------------------------------------


def _manifest(tmp_path: Path, *lines: bytes) -> Path:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


GOOD = b'{"image_id": "a", "file_name": "a.jpg", "width": 4, "height": 4}'


def test_a_manifest_that_is_not_utf8_names_file_line_and_fix(dataset, tmp_path, capsys):
    latin1 = '{"image_id": "b", "file_name": "café.jpg", "width": 4, "height": 4}'.encode("latin-1")
    path = _manifest(tmp_path, GOOD, latin1)
    with pytest.raises(SamcpError) as info:
        read_manifest(path)
    assert str(info.value).startswith(f"{path}:2: not UTF-8 text (byte 0xe9 at column 36)")
    assert "save the manifest as UTF-8" in str(info.value)
    code, _, err = _run_cli(_slic_args(path, tmp_path / "c"), capsys)
    assert code == 2 and "m.jsonl:2: not UTF-8" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_a_manifest_with_a_utf8_bom_is_read(tmp_path):
    path = _manifest(tmp_path, b"\xef\xbb\xbf" + GOOD)
    assert [r.image_id for r in read_manifest(path)] == ["a"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'["a", "a.jpg", 4, 4]', "m.jsonl:2: expected a JSON object"),
        (b'{"image_id": "b", "width": 4, "height": 4}', "m.jsonl:2: missing key(s) file_name"),
        (
            b'{"image_id": "b", "file_name": "b.jpg", "width": 4, "height": "4"}',
            "m.jsonl:2: height must be a positive integer",
        ),
        (
            b'{"image_id": "b", "file_name": "b.jpg", "width": 4, "height": 4.5}',
            "m.jsonl:2: height must be a positive integer",
        ),
    ],
)
def test_malformed_manifest_lines_name_file_and_line(tmp_path, line, message):
    with pytest.raises(SamcpError) as info:
        read_manifest(_manifest(tmp_path, GOOD, line))
    assert message in str(info.value)


# --- 3. Ray processes never outlive the driver -----------------------------------------------------


def test_the_watchdog_runs_only_for_a_local_ray(monkeypatch):
    ray = pytest.importorskip("ray")
    calls = []

    class FakeWatchdog:
        def __init__(self) -> None:
            calls.append("watchdog")

        def seal(self) -> None:
            calls.append("seal")

        def stop(self) -> None:
            calls.append("stop")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(("init", kw.get("address"))))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(pre, "RayWatchdog", FakeWatchdog)
    cluster = pre.PrecomputeConfig(source="x", out="y", ray_address="ray://head:10001")
    with pre._ray_session(cluster):
        pass
    assert calls == [("init", "ray://head:10001"), "shutdown"]
    calls.clear()
    with pre._ray_session(pre.PrecomputeConfig(source="x", out="y")):
        pass
    assert calls == ["watchdog", ("init", None), "seal", "shutdown", "stop"]


_DRIVER = textwrap.dedent(
    """
    import subprocess, sys, time
    from samcp.pipeline.raywatch import RayWatchdog

    dog = RayWatchdog()
    # A "raylet" that starts an "agent" in its own session, as Ray's raylet does.
    tree = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time;"
        "a = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
        " start_new_session=True);"
        "print(a.pid, flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    print(dog.pid, tree.pid, tree.stdout.readline().strip(), flush=True)
    time.sleep(1.2)  # let the watchdog see the tree, then say "ray.init has returned"
    dog.seal()
    # The host program's own child, started later: never the watchdog's to kill.
    late = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(late.pid, flush=True)
    if sys.argv[1] == "stop":
        time.sleep(1.5)  # let the watchdog see the tree
        dog.stop()
        print("stopped", flush=True)
    time.sleep(120)
    """
)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie is dead, only not yet reaped


@pytest.mark.slow  # a few seconds: the driver imports samcp (and torch) first
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states in /proc")
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_the_watchdog_kills_what_a_killed_driver_started_and_only_then(how):
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, how], stdout=subprocess.PIPE, text=True
    )
    others: list[int] = []
    late_only: list[int] = []
    try:
        dog, child, grandchild = (int(x) for x in driver.stdout.readline().split())
        others = [child, grandchild]
        late = int(driver.stdout.readline())
        assert all(_alive(p) for p in (dog, *others, late))
        late_only = [late]
        if how == "stop":
            assert driver.stdout.readline().strip() == "stopped"
            assert not _alive(dog)
        else:
            time.sleep(1.2)  # the watchdog polls twice a second
        driver.kill()
        driver.wait()
        if how == "kill":
            deadline = time.time() + 10
            while time.time() < deadline and any(_alive(p) for p in (dog, *others)):
                time.sleep(0.1)
            assert not any(_alive(p) for p in (dog, *others))
            assert _alive(late)  # started after seal(): not Ray's
        else:  # a clean stop kills nothing, not even after the driver is gone
            time.sleep(0.5)
            assert all(_alive(p) for p in others)
    finally:
        driver.kill()
        driver.wait()
        for pid in [*others, *late_only]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _descendants(pid: int) -> dict[int, str]:
    import psutil

    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    out = {}
    for p in procs:
        try:
            out[p.pid] = " ".join(p.cmdline())
        except psutil.Error:
            pass
    return out


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states in /proc")
def test_kill_9_of_a_ray_driver_leaves_no_ray_process_and_the_rerun_resumes(
    tmp_path, ray_precompute_argv
):
    pytest.importorskip("ray")  # also puts Ray's bundled psutil on the path
    data = tmp_path / "data"
    make_synthetic_dataset(data, seed=6, num_train=0, num_val=8, height=200, width=260)
    out = tmp_path / "cache"
    cmd = ray_precompute_argv(data, out)
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[int, str] = {}
    try:
        deadline = time.time() + 180
        while time.time() < deadline and driver.poll() is None:
            seen.update(_descendants(driver.pid))
            if any("ShardWorker" in c for c in seen.values()) and any(
                "raylet" in c for c in seen.values()
            ):
                break
            time.sleep(0.05)
        seen.update(_descendants(driver.pid))
        assert driver.poll() is None, "the run ended before the kill; give it more work"
        assert any("DashboardAgent" in c or "RuntimeEnvAgent" in c for c in seen.values()), seen
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.time() + 15
        while time.time() < deadline and any(_alive(p) for p in seen):
            time.sleep(0.2)
        left = {p: c for p, c in seen.items() if _alive(p)}
        assert not left, f"Ray processes outlived the killed driver: {left}"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for pid in seen:  # never leave strays behind, whatever failed
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    # The same command resumes: it takes over the dead run's lock and finishes the cache.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "taking over the lock" in again.stderr
    reader = CacheReader(out)
    assert len(reader.shard_ids) == 8 and not reader.incomplete_shard_ids
    assert not (out / folderlock.LOCK_FILE).exists()
