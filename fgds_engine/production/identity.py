"""A run's identity and its record, OUT/run.json.

``run.json`` records the run's identity, a hash of what determines the bytes (``run_identity``: an option at
its neutral value, the value that reproduces the behaviour before it existed, does not enter it;
``BYTES_VERSION`` is raised when a release changes the bytes of existing options). A folder written before
identities (its hash covered every option) resumes when its recorded configuration has the same identity.
The identity rules are read from the option declarations (``fields.option``: ``neutral=``,
``inert_unless=``, ``identity=False``) of the tables a run records (``RUN_TABLES``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from ..config import ModelOptions, RuntimeOptions, SamplerConfig
from ..errors import InputError
from ..plan import Plan
from ..writers import atomic_write
from .options import GenerateOptions, Worker

RUN_FILE = "run.json"
BYTES_VERSION = 1  # raise when a release changes the bytes that existing options give (folders then refuse)
# the tables of a run's configuration whose options' declarations say what enters its identity
RUN_TABLES = {"sampler": (SamplerConfig, RuntimeOptions), "models": (ModelOptions,),
              "options": (GenerateOptions,)}


def run_configuration(sampler, sampler_config: SamplerConfig, runtime: RuntimeOptions,
                      models: ModelOptions) -> dict:
    """The configuration ``fgds generate`` records in run.json (its identity hashes it): what the run
    computes and how it runs, one table as before the split of ``SamplerConfig`` (same hash), the models,
    and what runs: the pipeline's own scheduler, or the named one, and the resolved feedback form."""
    config = {"sampler": dataclasses.asdict(sampler_config) | dataclasses.asdict(runtime),
              "models": dataclasses.asdict(models) | {"device": None, "threads": None},
              # public keys only: diffusers' "_use_default_values" is a list in set order, which differs
              # between processes and would break resume and torchrun
              "scheduler": {"name": sampler.solver.name, "feedback_mode": sampler.feedback_mode,
                            "config": {k: v for k, v in sampler.scheduler.config.items()
                                       if not k.startswith("_")}}}
    if sampler.adapter is not None and sampler.adapter.denoiser != "unet":
        # the transformer families record their family and prediction type (flow for FlowMatchEuler, whose
        # config names none); the UNet families' identities stay as the previous release wrote them
        config["denoiser"] = {"family": sampler.adapter.family,
                              "prediction_type": sampler.solver.prediction_type}
    return config


def recorded_batch(out: str | Path) -> tuple[int, int | None] | None:
    """(batch_size, feedback_chunk) of the run recorded in OUT/run.json, if there is one."""
    run_file = Path(out) / RUN_FILE
    if not run_file.exists():
        return None
    config = json.loads(run_file.read_text())["config"]
    return config["options"]["batch_size"], config["sampler"].get("feedback_chunk")


def config_hash(config: dict) -> str:
    """The previous release's run hash: every field of the configuration (kept to name its records)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def identity_rules() -> dict[str, dict[str, dict]]:
    """Per table of the run configuration, the fields that declare ``neutral=`` / ``inert_unless=`` /
    ``identity=``."""
    keys = {"neutral", "inert_unless", "identity", "legacy"}
    return {t: {f.name: f.metadata for cls in classes for f in dataclasses.fields(cls)
                if keys & set(f.metadata)} for t, classes in RUN_TABLES.items()}


def _plain(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def run_identity(config: dict) -> str:
    """SHA-256 (16 hex digits) of what determines a run's bytes: its configuration, less the options at
    their neutral value (``option(neutral=...)``: the value that reproduces the behaviour before the option
    existed), the options that only act beside another one (``option(inert_unless=...)``) when that one is
    neutral or absent, and those that never change the bytes (``option(identity=False)``: sharding, threads
    of the writer), plus ``BYTES_VERSION``; a value renamed since (``option(legacy={new: old})``) enters
    under its old spelling. So a release that adds an option or renames a value leaves the identity of every
    existing folder as it was."""
    config = _plain(config)
    for table, rules in identity_rules().items():
        values = config.get(table)
        if not isinstance(values, dict):
            continue
        neutral = {k for k, m in rules.items() if "neutral" in m and k in values
                   and values[k] == _plain(m["neutral"])}
        inert = {k for k, m in rules.items() if m.get("inert_unless") is not None
                 and (m["inert_unless"] not in values or m["inert_unless"] in neutral)}
        inert |= {k for k, m in rules.items() if m.get("identity") is False}
        for k in neutral | inert:
            values.pop(k, None)
        for k, m in rules.items():  # a renamed value is hashed under its old spelling
            if m.get("legacy") and isinstance(values.get(k), str):
                values[k] = m["legacy"].get(values[k], values[k])
    return config_hash({"bytes_version": BYTES_VERSION, "config": config})


def read_run_json(path: Path) -> dict:
    """A run record (or InputError: damaged)."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path} is damaged (cut short or edited?); nothing was changed: restore it, or "
                         "pass --new-run to archive the run's manifest and start over") from None


def start_run(out: Path, run_config: dict, plan: Plan, *, new_run: bool, worker: Worker) -> str:
    """Record (or check) the run's identity in OUT/run.json; returns the hash its manifest records carry.

    A run.json of the previous release (no identity recorded) resumes when its configuration has the same
    identity and its plan is this one; its records keep their hash. Otherwise one line says why and how to
    go on, and nothing is changed (unless --new-run, which archives the run's files as previous-*)."""
    identity = run_identity(run_config)
    run_file = out / RUN_FILE
    if run_file.exists():
        old = read_run_json(run_file)
        if "config" not in old or "config_hash" not in old:
            raise InputError(f"{run_file} is not a run record of fgds-engine; nothing was changed: move it "
                             "away")
        version = old.get("bytes_version", 1)
        legacy = "identity" not in old
        same_plan = old["config"].get("plan") == (plan.job_list_digest() if legacy and plan.is_table
                                                  else run_config["plan"])
        old_identity = old.get("identity") or run_identity({**old["config"], "plan": run_config["plan"]})
        if version != BYTES_VERSION:
            why = ("was generated by a release whose images differ from this one's (bytes version "
                   f"{version}, this release {BYTES_VERSION}): finish it with that release, or pass "
                   "--new-run")
        elif not same_plan:
            why = ("holds a run of another plan (planned again, or plan.json copied from another folder?): "
                   "plan it as it was, or pass --new-run")
        elif old_identity != identity:
            why = (f"holds a run with another configuration (identity {old_identity}, this one {identity}): "
                   "pass --new-run")
        else:
            if legacy and worker.index == 0:  # recorded once: later resumes compare identities directly
                atomic_write(run_file, _run_json(old["config_hash"], identity, run_config), worker.tag)
            return old["config_hash"]
        if not new_run:
            raise InputError(f"{out} {why} to archive its manifest and start over, or write to another "
                             "folder; nothing was changed")
        if worker.index == 0:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            for p in [run_file, *out.glob("manifest-*.jsonl"), *out.glob("units-*.bin")]:
                os.replace(p, out / f"previous-{stamp}-{p.name}")
    if not run_file.exists():  # every worker writes the same content; the rename makes any order safe
        atomic_write(run_file, _run_json(identity, identity, run_config), worker.tag)
    return identity


def _run_json(records_hash: str, identity: str, config: dict) -> bytes:
    return (json.dumps({"config_hash": records_hash, "identity": identity, "bytes_version": BYTES_VERSION,
                        "config": config}, indent=1, sort_keys=True, default=str) + "\n").encode()
