"""One live worker per part (fgds_engine/production/lease.py): a second worker of the same part is refused in
one line naming the holder; a killed holder's part is taken over at once; two launches at once never run a
job twice. No verdict here depends on timing: a holder is a process that holds the lease until told."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from test_production import BIG, STEPS, gen, images, planned, records

from fgds_engine.errors import OutputError
from fgds_engine.plan import read_plan
from fgds_engine.production import PartLease, Worker, lease_path

HOLD = ("import sys; from fgds_engine.production import PartLease, Worker; "
        "lease = PartLease.acquire(sys.argv[1], Worker()); print('held', flush=True); sys.stdin.read()")


def holder(out):
    """A process that holds part 0 of ``out`` until its stdin closes; returned once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def refusal(out, pid) -> str:
    part = Worker().part
    return (rf"worker part {part} of {re.escape(str(out))} is running already: held by pid {pid} on "
            rf"{re.escape(socket.gethostname())} since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d \w*; wait for it or "
            r"stop it \(a part has one live worker; after the holder ends, a relaunch takes over at once\)")


def test_a_second_lease_of_the_same_part_is_refused_and_a_released_one_is_taken(tmp_path):
    first = PartLease.acquire(tmp_path, Worker())
    assert json.loads(lease_path(tmp_path, Worker()).read_text())["pid"] == os.getpid()
    with pytest.raises(OutputError) as err:
        PartLease.acquire(tmp_path, Worker())
    assert re.fullmatch(refusal(tmp_path, os.getpid()), str(err.value))
    other = PartLease.acquire(tmp_path, Worker(1, 2))  # another part: its own lease
    other.release()
    first.release()
    assert not lease_path(tmp_path, Worker()).exists()  # a finished holder leaves nothing
    with PartLease.acquire(tmp_path, Worker()):
        pass


def test_fgds_generate_is_refused_while_another_process_holds_the_part(tmp_path, capsys):
    out = planned(tmp_path)
    proc = holder(out)
    try:
        assert gen(out) == 2
        err = capsys.readouterr().err
        assert re.fullmatch("fgds: error: " + refusal(out, proc.pid) + "\n", err)
        assert records(out) == [] and not list(out.glob("*/*.png"))  # refused before any sampling
    finally:
        proc.stdin.close()
        proc.wait()
    assert gen(out) == 0 and len(records(out)) == 20  # the holder ended: the part runs


def test_a_holder_killed_9_is_taken_over_at_once_byte_identical(tmp_path):
    """kill -9 leaves the lease file with the dead holder's name; the kernel dropped its lock, so the next
    launch takes the part at once and the output equals an uninterrupted run's."""
    out, ref = planned(tmp_path, "out"), planned(tmp_path, "ref")
    assert gen(ref) == 0
    proc = holder(out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert lease_path(out, Worker()).exists()  # nothing cleaned it, and nothing needs to
    assert gen(out) == 0
    assert images(out) == images(ref) and not lease_path(out, Worker()).exists()


def test_two_launches_at_once_run_every_job_once(tmp_path):
    """The issue's case: the same command in two terminals. Whichever takes the part runs it; the other is
    refused (or, if it starts after the first finished, finds nothing left); never a job twice."""
    out = planned(tmp_path, counts=BIG)
    cmd = [sys.executable, "-m", "fgds_engine.cli", "generate", str(out), "--preset", "tiny-random",
           "--batch-size", "4", *STEPS]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(), p.communicate()[1]) for p in procs]
    jobs = sorted(j.job_id for j in read_plan(out).jobs)
    assert sorted(r["job_id"] for r in records(out)) == jobs  # 65 records for 65 jobs
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2])
    for code, err in results:
        if code == 2:
            assert re.fullmatch(r"fgds: error: worker part \S+ of .* is running already: held by pid \d+ "
                                r".*\n", err)


def test_the_python_api_holds_the_lease_too(tmp_path):
    """generate_dataset takes the part's lease itself when its caller did not."""
    from fgds_engine.production import GenerateOptions, generate_dataset

    out = planned(tmp_path)
    with PartLease.acquire(out, Worker()):
        with pytest.raises(OutputError, match="is running already"):
            generate_dataset(read_plan(out), out, lambda *a: None, GenerateOptions(), {}, progress=False)
    assert records(out) == []
